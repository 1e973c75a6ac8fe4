"""Job stores: one interface (`JobStore`), a Redis backend and a local SQLite backend side by side."""

from __future__ import annotations

import sqlite3

import redis

from adapter_merge.core.settings import Settings
from adapter_merge.core.store.base import JobStore

__all__ = ["STORE_UNAVAILABLE", "JobStore", "open_store"]

STORE_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, sqlite3.OperationalError,
)
"""Errors that mean 'the store is down or busy, try again', not a bug."""


def open_store(settings: Settings) -> JobStore:
    """Redis when the service runs distributed, else the SQLite file in the data dir."""
    if settings.redis_url:
        from adapter_merge.core.store.redis import RedisJobStore

        return RedisJobStore(settings.redis_url, settings.redis_prefix)
    from adapter_merge.core.store.local import SQLiteJobStore

    return SQLiteJobStore(settings.data_dir / "jobs.sqlite3")
