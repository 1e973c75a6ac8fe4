"""Embedded-mode job store: one SQLite file under MERGE_DATA_DIR, shared by the API and its local worker.

SQLite gives durable state (queued jobs survive a restart) and cross-process atomicity (BEGIN IMMEDIATE)
with nothing to install. It is meant for one machine: keep it off network filesystems.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from adapter_merge.core.jobs import ACTIVE_STATUSES, DEFAULT_TENANT, FINISHED_STATUSES, JobRecord, JobStatus
from adapter_merge.core.store.base import Change, JobStore, QuotaExceeded

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
"""
_TENANT_COLUMN = f"ALTER TABLE jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT '{DEFAULT_TENANT}'"
_TENANT_INDEX = "CREATE INDEX IF NOT EXISTS jobs_tenant_status_created ON jobs (tenant, status, created_at)"


class SQLiteJobStore(JobStore):
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            if "tenant" not in columns:  # a data dir from before tenants: its jobs belong to the default tenant
                db.execute(_TENANT_COLUMN)
            db.execute(_TENANT_INDEX)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # A connection per call: cheap for SQLite, and safe across threads and forked processes.
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=NORMAL")
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def create(self, job: JobRecord, max_active: int | None = None) -> None:
        with self._transaction() as db:
            if max_active is not None:
                where, args = _where(ACTIVE_STATUSES, job.tenant)
                active = db.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]
                if active >= max_active:
                    raise QuotaExceeded(job.tenant, active, max_active)
            db.execute("INSERT INTO jobs (id, status, created_at, tenant, doc) VALUES (?, ?, ?, ?, ?)",
                       (job.id, job.status.value, job.created_at.timestamp(), job.tenant, job.to_json()))

    def get(self, job_id: str) -> JobRecord | None:
        with self._connect() as db:
            row = db.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRecord.from_json(row[0]) if row else None

    def list(
        self, statuses: Collection[JobStatus] | None = None, limit: int = 50, offset: int = 0,
        oldest_first: bool = False, tenant: str | None = None,
    ) -> tuple[list[JobRecord], int]:
        where, args = _where(statuses, tenant)
        order = "ASC" if oldest_first else "DESC"
        with self._connect() as db:
            total = db.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]
            rows = db.execute(
                f"SELECT doc FROM jobs {where} ORDER BY created_at {order}, id {order} LIMIT ? OFFSET ?",
                [*args, limit, offset],
            ).fetchall()
        return [JobRecord.from_json(row[0]) for row in rows], total

    def update(self, job_id: str, change: Change) -> JobRecord | None:
        with self._transaction() as db:
            row = db.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            new = change(JobRecord.from_json(row[0]), self.now())
            if new is None:
                return None
            db.execute("UPDATE jobs SET status = ?, doc = ? WHERE id = ?", (new.status.value, new.to_json(), job_id))
        return new

    def delete(self, job_id: str, only: Collection[JobStatus] = FINISHED_STATUSES) -> bool:
        with self._transaction() as db:
            cursor = db.execute(
                f"DELETE FROM jobs WHERE id = ? AND status IN ({', '.join('?' * len(only))})",
                [job_id, *(JobStatus(s).value for s in only)],
            )
            return cursor.rowcount > 0

    def now(self) -> float:
        return time.time()

    def ping(self) -> None:
        with self._connect() as db:
            db.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()


def _where(statuses: Collection[JobStatus] | None, tenant: str | None) -> tuple[str, list[str]]:
    """A WHERE clause (and its arguments) for jobs of some statuses and/or one tenant."""
    clauses, args = [], []
    if statuses is not None:
        clauses.append(f"status IN ({', '.join('?' * len(statuses))})")
        args += [JobStatus(s).value for s in statuses]
    if tenant is not None:
        clauses.append("tenant = ?")
        args.append(tenant)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", args
