"""Shared fixtures: `postgres_url`, a fresh PostgreSQL schema for one test.

Without a reachable server the PostgreSQL cases are skipped, except on CI (`CI=true`), which has
one and must not pass by skipping.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The server's URL, once it has answered (pytest caches a skip or failure per worker)."""
    url = os.environ.get("GPUCTL_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    try:
        psycopg.connect(_libpq(url), connect_timeout=2).close()
    except psycopg.Error as e:
        shown = re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", url)
        message = (
            f"PostgreSQL not reachable at {shown} ({e}). Start one there, or point "
            "GPUCTL_TEST_POSTGRES_URL at a database the tests may create schemas in."
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return url


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A URL whose connections see only a new, empty schema, dropped after the test.

    CI reuses one database and xdist runs tests side by side, so each test gets its own schema.
    """
    schema = f"gpuctl_test_{uuid.uuid4().hex}"
    with psycopg.connect(_libpq(postgres_server), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    parts = urlsplit(postgres_server)
    query = [*parse_qsl(parts.query), ("options", f"-csearch_path={schema}")]
    yield urlunsplit(parts._replace(query=urlencode(query)))
    with psycopg.connect(_libpq(postgres_server), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def _libpq(url: str) -> str:
    # libpq knows "postgresql://", not SQLAlchemy's "postgresql+psycopg://".
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", url)
