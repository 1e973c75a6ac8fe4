"""Job stores: one interface (`JobStore`), a Redis backend and a local SQLite backend side by side."""

from __future__ import annotations

from service.settings import Settings
from service.store.base import JobStore
from service.store.models import (
    ACTIVE_STATUSES,
    FINISHED_STATUSES,
    ArtifactRecord,
    JobRecord,
    JobStatus,
    ProgressRecord,
    utcnow,
)

__all__ = [
    "ACTIVE_STATUSES",
    "FINISHED_STATUSES",
    "ArtifactRecord",
    "JobRecord",
    "JobStatus",
    "JobStore",
    "ProgressRecord",
    "open_store",
    "utcnow",
]


def open_store(settings: Settings) -> JobStore:
    """Redis when the service runs distributed, else the SQLite file in the data dir."""
    if settings.redis_url:
        from service.store.redis import RedisJobStore

        return RedisJobStore(settings.redis_url, settings.redis_prefix)
    from service.store.local import SQLiteJobStore

    return SQLiteJobStore(settings.data_dir / "jobs.sqlite3")
