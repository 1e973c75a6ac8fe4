"""Embedded-mode job store: one SQLite file under MERGE_DATA_DIR, shared by the API and its local worker.

SQLite gives durable state (queued jobs survive a restart) and cross-process atomicity (BEGIN IMMEDIATE)
with nothing to install. It is meant for one machine: keep it off network filesystems.

The database is in WAL mode, so that reads never wait for writes. While merges write their results, the disk's
queue is full and every fsync takes 0.1-0.5 s; with a rollback journal each commit held the database's
exclusive lock through its fsync, and the API's reads (GET /jobs/{id}) waited behind the running jobs' progress
commits: p99 0.45-1.2 s with two merges running. In WAL mode a read sees the last commit and takes no lock a
writer holds. Writes that record what must survive a power cut (a job created, claimed, finished, cancelled,
deleted) sync the WAL at commit (`synchronous=FULL`); a running job's heartbeat and progress, a worker's
presence and the named locks do not (`NORMAL`: a power cut may lose the last of them, never the database;
it also ends every process that held a lock).

A full disk must not take the API down, since deleting jobs through it is how space is freed:

- In WAL mode each connection needs the `-shm` index, which the first connection creates and sizes (32 KiB)
  and the last one deletes on closing. The API keeps one connection open for as long as it runs
  (`hold_open`), so the index and the WAL stay in place and reads need no new space. The WAL is kept small,
  given all the blocks it will use when the API starts, and reused after each checkpoint
  (`WAL_CHECKPOINT_PAGES`), so writes need no new space for it either.
- `jobs.sqlite3.reserve` holds `RESERVE_BYTES` that a write which finds the disk full deletes before trying
  once more (a delete, a cancel, a failed job's outcome), as does the API opening its connection; the reserve
  comes back once there is room again. A write that still finds no space is a 507 storage-full, not a 503.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from adapter_merge.core.jobs import ACTIVE_STATUSES, DEFAULT_TENANT, FINISHED_STATUSES, JobRecord, JobStatus
from adapter_merge.core.problems import Problem, Problems
from adapter_merge.core.store.base import Change, Cursor, IdempotencyRecord, JobStore, QuotaExceeded
from adapter_merge.core.store.sqlite_lock import PatientConnection

log = logging.getLogger(__name__)
_T = TypeVar("_T")
RESERVE_BYTES = 4 << 20
"""Far more than the journal of any one write of the store needs."""
WAL_CHECKPOINT_PAGES = 32
"""A writer that finds this many pages in the WAL copies them into the database, after which the WAL is
written again from its start: it stays small (128 KiB and a transaction) and keeps its blocks, which a write
on a full disk then reuses (`_grow_wal` gives it them when the API starts)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS locks (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    owner TEXT NOT NULL,
    job_id TEXT,
    status_code INTEGER,
    expires_at REAL NOT NULL,
    PRIMARY KEY (tenant, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_expires ON idempotency_keys (expires_at);
"""
_TENANT_COLUMN = f"ALTER TABLE jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT '{DEFAULT_TENANT}'"
_TENANT_INDEX = "CREATE INDEX IF NOT EXISTS jobs_tenant_status_created ON jobs (tenant, status, created_at)"
_DIGEST_COLUMN = "ALTER TABLE jobs ADD COLUMN request_digest TEXT"
_DIGEST_INDEX = "CREATE INDEX IF NOT EXISTS jobs_tenant_digest_created ON jobs (tenant, request_digest, created_at)"

_WEBHOOK_COLUMN = "ALTER TABLE jobs ADD COLUMN webhook_due REAL"
_WEBHOOK_INDEX = "CREATE INDEX IF NOT EXISTS jobs_webhook_due ON jobs (webhook_due) WHERE webhook_due IS NOT NULL"
"""Jobs whose callback is pending, by when its next attempt is due (`due_webhooks`)."""


class SQLiteJobStore(JobStore):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.reserve = path.with_name(path.name + ".reserve")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._keeper: PatientConnection | None = None
        with self._writing(durable=True) as db:
            # Persistent in the file: the first store of a new version converts a database in rollback mode.
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)  # IF NOT EXISTS: writes nothing to an existing store (a full disk is fine)
            columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            if "tenant" not in columns:  # a data dir from before tenants: its jobs belong to the default tenant
                db.execute(_TENANT_COLUMN)
            if "request_digest" not in columns:  # a data dir from before digests: its jobs are never reused
                db.execute(_DIGEST_COLUMN)
            db.execute(_TENANT_INDEX)
            db.execute(_DIGEST_INDEX)
            if "webhook_due" not in columns:  # a data dir from before callbacks: none of its jobs has one
                db.execute(_WEBHOOK_COLUMN)
            db.execute(_WEBHOOK_INDEX)
        self._restore_reserve()

    def _open(self) -> PatientConnection:
        return sqlite3.connect(self.path, timeout=0, isolation_level=None, factory=PatientConnection)

    @contextmanager
    def _connect(self) -> Iterator[PatientConnection]:
        # A connection per call: cheap for SQLite, and safe across threads and forked processes.
        db = self._open()
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def _writing(self, durable: bool) -> Iterator[PatientConnection]:
        """A connection that writes; `durable`: its commits are synced to the disk before they return."""
        with self._connect() as db:
            db.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            yield db

    @contextmanager
    def _transaction(self, durable: bool) -> Iterator[sqlite3.Connection]:
        with self._writing(durable) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:  # SQLite rolls back by itself after some errors (a full disk among them)
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _write(self, body: Callable[[sqlite3.Connection], _T], durable: bool = True) -> _T:
        """Run `body` in one write transaction. On a full disk the reserve is given up and the write tried once
        more; if it still finds no space it fails as storage-full."""
        released = False
        while True:
            try:
                with self._transaction(durable) as db:
                    result = body(db)
            except sqlite3.OperationalError as error:
                if not _out_of_space(error):
                    raise
                if not released and self._release_reserve():
                    released = True
                    continue
                raise Problem(Problems.STORAGE_FULL, "the job store cannot be written: the data dir's disk is "
                              "full; delete finished jobs or add space") from error
            self._restore_reserve()
            return result

    def hold_open(self) -> None:
        """Keep a connection, and with it the WAL index, open until `close` (see the module's note on a full
        disk). Only in a process that forks no child using the store: a connection must not cross a fork."""
        released = False
        while self._keeper is None:
            keeper = self._open()
            try:
                keeper.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()  # opens the WAL index
            except sqlite3.OperationalError as error:
                keeper.close()
                if not _out_of_space(error) or released or not self._release_reserve():
                    raise
                released = True
                continue
            self._keeper = keeper
        self._grow_wal()

    def _grow_wal(self) -> None:
        """Grow the WAL to twice its working size now, while the disk has room: a write of 2 x
        `WAL_CHECKPOINT_PAGES` pages, taken back in a second one. Between two checkpoints the WAL then never
        outgrows blocks it already has, so no later write needs new space for it."""
        def fill(db: sqlite3.Connection) -> None:
            page = db.execute("PRAGMA page_size").fetchone()[0]
            db.execute("CREATE TABLE IF NOT EXISTS wal_room (filler BLOB)")
            db.execute("INSERT INTO wal_room VALUES (zeroblob(?))", (2 * WAL_CHECKPOINT_PAGES * page,))

        try:
            self._write(fill, durable=False)
            self._write(lambda db: db.execute("DELETE FROM wal_room"), durable=False)
        except Problem as problem:  # started on a full disk: reads and deletes must still work
            log.warning("could not grow the job store's WAL ahead of time: %s", problem)

    def close(self) -> None:
        if self._keeper is not None:
            self._keeper.close()
            self._keeper = None

    def _release_reserve(self) -> bool:
        try:
            self.reserve.unlink()
        except FileNotFoundError:
            return False
        log.warning("the disk of %s is full: released the job store's reserve of %d bytes", self.path, RESERVE_BYTES)
        return True

    def _restore_reserve(self) -> None:
        """Put the reserve back once the disk has room for it twice over (after every write; a stat when
        it is there)."""
        if self.reserve.exists() or shutil.disk_usage(self.path.parent).free < 2 * RESERVE_BYTES:
            return
        draft = self.reserve.with_name(f".{self.reserve.name}-{uuid.uuid4().hex[:8]}")
        try:
            with draft.open("wb") as file:
                for _ in range(RESERVE_BYTES // (1 << 20)):
                    file.write(bytes(1 << 20))  # real blocks, not a sparse file: deleting it must free space
                file.flush()
                os.fsync(file.fileno())
            os.replace(draft, self.reserve)
        except OSError as error:
            log.warning("could not put back the job store's reserve (%s)", error)
        finally:
            with contextlib.suppress(FileNotFoundError):
                draft.unlink()

    def create(self, job: JobRecord, max_active: int | None = None) -> None:
        def insert(db: sqlite3.Connection) -> None:
            if max_active is not None:
                where, args = _where(ACTIVE_STATUSES, job.tenant)
                active = db.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]
                if active >= max_active:
                    raise QuotaExceeded(job.tenant, active, max_active)
            db.execute("INSERT INTO jobs (id, status, created_at, tenant, request_digest, doc) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (job.id, job.status.value, job.created_at.timestamp(), job.tenant,
                                                     job.request_digest, job.to_json()))
            if self.webhook_due(job) is not None:  # created finished (a reused result), its callback due
                db.execute("UPDATE jobs SET webhook_due = ? WHERE id = ?", (self.webhook_due(job), job.id))

        self._write(insert)

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

    def page_after(
        self, statuses: Collection[JobStatus] | None, tenant: str | None, oldest_first: bool, after: Cursor | None,
        limit: int,
    ) -> tuple[list[JobRecord], Cursor | None]:
        where, args = _where(statuses, tenant)
        order, beyond = ("ASC", ">") if oldest_first else ("DESC", "<")
        if after is not None:
            where = f"{where} AND" if where else "WHERE"
            where = f"{where} (created_at, id) {beyond} (?, ?)"
            args = [*args, *after]
        with self._connect() as db:
            rows = db.execute(f"SELECT created_at, id, doc FROM jobs {where} ORDER BY created_at {order}, id {order} "
                              "LIMIT ?", [*args, limit]).fetchall()
        cursor = (rows[-1][0], rows[-1][1]) if len(rows) == limit else None
        return [JobRecord.from_json(row[2]) for row in rows], cursor

    def update(self, job_id: str, change: Change, durable: bool = True) -> JobRecord | None:
        def write(db: sqlite3.Connection) -> JobRecord | None:
            row = db.execute("SELECT doc FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            new = change(JobRecord.from_json(row[0]), self.now())
            if new is None:
                return None
            db.execute("UPDATE jobs SET status = ?, doc = ?, webhook_due = ? WHERE id = ?",
                       (new.status.value, new.to_json(), self.webhook_due(new), job_id))
            return new

        return self._write(write, durable)

    def delete(self, job_id: str, only: Collection[JobStatus] = FINISHED_STATUSES) -> bool:
        def remove(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                f"DELETE FROM jobs WHERE id = ? AND status IN ({', '.join('?' * len(only))})",
                [job_id, *(JobStatus(s).value for s in only)],
            )
            return cursor.rowcount > 0

        return self._write(remove)

    def with_digest(self, tenant: str, digest: str, statuses: Collection[JobStatus]) -> list[JobRecord]:
        where, args = _where(statuses, tenant)
        with self._connect() as db:
            rows = db.execute(f"SELECT doc FROM jobs {where} AND request_digest = ? ORDER BY created_at DESC, id DESC",
                              [*args, digest]).fetchall()
        return [JobRecord.from_json(row[0]) for row in rows]

    def claim_key(self, tenant: str, key: str, fingerprint: str, owner: str,
                  hold_seconds: float) -> IdempotencyRecord | None:
        def claim(db: sqlite3.Connection) -> IdempotencyRecord | None:
            now = self.now()
            db.execute("DELETE FROM idempotency_keys WHERE expires_at <= ?", (now,))  # the sweep: expired keys go
            row = db.execute("SELECT fingerprint, owner, job_id, status_code FROM idempotency_keys "
                             "WHERE tenant = ? AND key = ?", (tenant, key)).fetchone()
            if row is not None:
                return IdempotencyRecord(*row)
            db.execute("INSERT INTO idempotency_keys (tenant, key, fingerprint, owner, expires_at) "
                       "VALUES (?, ?, ?, ?, ?)", (tenant, key, fingerprint, owner, now + hold_seconds))
            return None

        return self._write(claim)

    def settle_key(self, tenant: str, key: str, owner: str, job_id: str, status_code: int,
                   ttl_seconds: float) -> None:
        self._write(lambda db: db.execute(
            "UPDATE idempotency_keys SET job_id = ?, status_code = ?, expires_at = ? "
            "WHERE tenant = ? AND key = ? AND owner = ? AND job_id IS NULL",
            (job_id, status_code, self.now() + ttl_seconds, tenant, key, owner)))

    def release_key(self, tenant: str, key: str, owner: str) -> None:
        self._write(lambda db: db.execute(
            "DELETE FROM idempotency_keys WHERE tenant = ? AND key = ? AND owner = ? AND job_id IS NULL",
            (tenant, key, owner)))

    def due_webhooks(self, now: float, limit: int) -> list[str]:
        with self._connect() as db:
            rows = db.execute("SELECT id FROM jobs WHERE webhook_due <= ? ORDER BY webhook_due LIMIT ?",
                              (now, limit)).fetchall()
        return [row[0] for row in rows]

    def acquire_lock(self, name: str, owner: str, seconds: float) -> bool:
        def take(db: sqlite3.Connection) -> bool:
            now = self.now()
            row = db.execute("SELECT owner, expires_at FROM locks WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] != owner and row[1] > now:
                return False
            db.execute("INSERT OR REPLACE INTO locks (name, owner, expires_at) VALUES (?, ?, ?)",
                       (name, owner, now + seconds))
            return True

        return self._write(take, durable=False)  # a power cut ends every holder, and with them their locks

    def release_lock(self, name: str, owner: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM locks WHERE name = ? AND owner = ?", (name, owner)),
                    durable=False)

    def worker_seen(self, worker: str, seconds: float) -> None:
        now = self.now()

        def record(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM workers WHERE expires_at <= ?", (now,))
            db.execute("INSERT OR REPLACE INTO workers (id, expires_at) VALUES (?, ?)", (worker, now + seconds))

        self._write(record, durable=False)

    def live_workers(self) -> list[str]:
        with self._connect() as db:
            rows = db.execute("SELECT id FROM workers WHERE expires_at > ? ORDER BY id", (self.now(),)).fetchall()
        return [row[0] for row in rows]

    def now(self) -> float:
        return time.time()

    def ping(self) -> None:
        with self._connect() as db:
            db.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()


def _out_of_space(error: sqlite3.OperationalError) -> bool:
    """A write that found the disk full, or a connection that could not size the WAL index on it."""
    code = error.sqlite_errorcode
    return code & 0xFF == sqlite3.SQLITE_FULL or code == sqlite3.SQLITE_IOERR_SHMSIZE


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
