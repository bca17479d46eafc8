"""What gpuctld keeps on disk is its own: state directories 0700 (tightened, with a warning,
when found looser), the SQLite store and its -wal/-shm files 0600, rank logs 0600 in 0700
directories, whatever the umask. The agent's side is in tests/test_agent_runner.py.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuctl.runtime.logstore import LogStore
from gpuctl.runtime.private import (
    PRIVATE_DIR_MODE,
    TRAVERSE_ONLY_DIR_MODE,
    make_private_dirs,
    private_opener,
    private_state_dir,
)
from gpuctl.store.sql import open_store


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The loosest umask, 0: every mode below comes from the code, not from the umask."""
    old = os.umask(0)
    yield
    os.umask(old)


# fmt: off
STATE_DIR_CASES = [
    # id,                     existing mode, wanted,                 resulting mode, warned
    ("created",               None,          PRIVATE_DIR_MODE,       0o700,          False),
    ("created-traverse-only", None,          TRAVERSE_ONLY_DIR_MODE, 0o711,          False),
    ("already-private",       0o700,         PRIVATE_DIR_MODE,       0o700,          False),
    ("world-readable",        0o755,         PRIVATE_DIR_MODE,       0o700,          True),
    ("group-only",            0o750,         PRIVATE_DIR_MODE,       0o700,          True),
    ("traverse-only-kept",    0o711,         TRAVERSE_ONLY_DIR_MODE, 0o711,          False),
    ("to-traverse-only",      0o755,         TRAVERSE_ONLY_DIR_MODE, 0o711,          True),
    ("group-listing-dropped", 0o750,         TRAVERSE_ONLY_DIR_MODE, 0o710,          True),
    # Tightening only: an operator's stricter choice stands.
    ("stricter-stands",       0o700,         TRAVERSE_ONLY_DIR_MODE, 0o700,          False),
    ("setgid-kept",           0o2775,        PRIVATE_DIR_MODE,       0o2700,         True),
]
# fmt: on


@pytest.mark.usefixtures("open_umask")
@pytest.mark.parametrize(
    ("existing", "wanted", "expected", "warned"),
    [c[1:] for c in STATE_DIR_CASES],
    ids=[c[0] for c in STATE_DIR_CASES],
)
def test_private_state_dir(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    existing: int | None,
    wanted: int,
    expected: int,
    warned: bool,
) -> None:
    path = tmp_path / "parent" / "state"
    if existing is not None:
        path.mkdir(parents=True)
        path.chmod(existing)
    with caplog.at_level(logging.WARNING, logger="gpuctl.runtime.private"):
        assert private_state_dir(path, wanted) == path
    assert mode(path) == expected
    warnings = [r.getMessage() for r in caplog.records]
    if warned:
        assert warnings == [
            f"state directory {path} was mode {existing:04o}, open to other accounts: "
            f"tightened to {expected:04o}"
        ]
    else:
        assert warnings == []


def test_a_file_in_the_way_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    with pytest.raises(NotADirectoryError):
        private_state_dir(tmp_path / "state")


@pytest.mark.usefixtures("open_umask")
def test_make_private_dirs_creates_every_level_and_leaves_existing_ones(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    make_private_dirs(shared / "a" / "b")
    assert (mode(shared), mode(shared / "a"), mode(shared / "a" / "b")) == (0o777, 0o700, 0o700)


def test_traverse_only_holds_under_a_strict_umask(tmp_path: Path) -> None:
    """A 077 umask would leave 0700, and the rank's account locked out of its own work dir."""
    old = os.umask(0o077)
    try:
        make_private_dirs(tmp_path / "work" / "7", TRAVERSE_ONLY_DIR_MODE)
    finally:
        os.umask(old)
    assert mode(tmp_path / "work") == mode(tmp_path / "work" / "7") == 0o711


@pytest.mark.usefixtures("open_umask")
@pytest.mark.parametrize("existing", [None, 0o644, 0o600], ids=["created", "tightened", "kept"])
def test_private_opener(tmp_path: Path, existing: int | None) -> None:
    path = tmp_path / "rank-0.log"
    if existing is not None:
        path.write_bytes(b"old\n")
        path.chmod(existing)
    with open(path, "ab", opener=private_opener) as f:
        f.write(b"new\n")
    assert mode(path) == 0o600
    assert path.read_bytes().endswith(b"new\n")


@pytest.mark.usefixtures("open_umask")
def test_log_store_files_are_private(tmp_path: Path) -> None:
    logs = LogStore(tmp_path / "state" / "logs", max_bytes_per_rank=1 << 20)
    assert logs.append(7, 1, 0, 0, b"token=hunter2\n") == 14
    path = logs.path(7, 1, 0)
    assert path.read_bytes() == b"token=hunter2\n"
    assert mode(path) == 0o600
    assert [mode(d) for d in (path.parent, path.parent.parent, logs.root)] == [0o700] * 3


@pytest.mark.usefixtures("open_umask")
def test_sqlite_store_files_are_private(tmp_path: Path) -> None:
    """SQLite gives -wal and -shm the database file's mode: that the store sets it is enough."""
    db = tmp_path / "state" / "gpuctld.db"
    store = open_store(f"sqlite:///{db}")
    try:
        store.list_jobs()  # a connection is open: -wal and -shm exist
        files = {p.name: mode(p) for p in db.parent.iterdir()}
    finally:
        store.close()
    assert files == {
        "gpuctld.db": 0o600,
        "gpuctld.db-wal": 0o600,
        "gpuctld.db-shm": 0o600,
        "gpuctld.db-writer": 0o600,  # the writers' lock (store.sql._WriterLock)
    }
    assert mode(db.parent) == 0o700


def test_a_looser_sqlite_store_is_tightened(tmp_path: Path) -> None:
    db = tmp_path / "gpuctld.db"
    open_store(f"sqlite:///{db}").close()
    for path in (db, db.with_name("gpuctld.db-wal")):
        path.touch()
        path.chmod(0o644)
    store = open_store(f"sqlite:///{db}")
    try:
        assert (mode(db), mode(db.with_name("gpuctld.db-wal"))) == (0o600, 0o600)
    finally:
        store.close()
