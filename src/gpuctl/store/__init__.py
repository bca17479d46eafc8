"""Persistence: the `Store` protocol and its SQL implementation (SQLite, PostgreSQL)."""

from gpuctl.store.base import JobPage, Store
from gpuctl.store.sql import SqlStore, open_store

__all__ = ["JobPage", "SqlStore", "Store", "open_store"]
