"""The embedded store's SQLite file: reads never wait for a writer, however long its commit takes, the API's
connection keeps the WAL in place, and a database from a version that used a rollback journal converts."""

from __future__ import annotations

import sqlite3
import statistics
import threading
import time
from pathlib import Path

from adapter_merge.core.jobs import JobStatus
from adapter_merge.core.store.local import WAL_CHECKPOINT_PAGES, SQLiteJobStore
from adapter_merge.core.store.sqlite_lock import PatientConnection
from tests.service.test_store import new_job


def test_a_read_does_not_wait_for_a_writer_holding_the_database(tmp_path: Path) -> None:
    """A writer holds the write lock with its change made but not committed (as a commit whose fsync is
    slow would): every read answers at once, with the last committed state."""
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    job = new_job()
    store.create(job)
    writer = sqlite3.connect(store.path, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")
    writer.execute("UPDATE jobs SET status = 'running' WHERE id = ?", (job.id,))
    try:
        started = time.monotonic()
        for _ in range(20):
            read = store.get(job.id)
            assert read is not None and read.status is JobStatus.queued
        assert time.monotonic() - started < 0.5
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_writer_takes_the_lock_within_milliseconds_of_its_release(tmp_path: Path) -> None:
    """Writers queue for the write lock without SQLite's growing sleeps (100 ms at a time once a wait has lasted
    a few tenths of a second): a BEGIN refused the lock for 0.4 s gets it within milliseconds of its release
    (the median of five, as the machine may be busy; taking the lock does no I/O)."""
    path = tmp_path / "locked.sqlite3"
    sqlite3.connect(path).execute("PRAGMA journal_mode=WAL").close()
    delays = []
    for _ in range(5):
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        waiter = sqlite3.connect(path, timeout=0, isolation_level=None, factory=PatientConnection,
                                 check_same_thread=False)
        taken: list[float] = []
        thread = threading.Thread(target=lambda waiter=waiter, taken=taken: (
            waiter.execute("BEGIN IMMEDIATE"), taken.append(time.monotonic())))
        thread.start()
        time.sleep(0.4)
        assert not taken
        holder.execute("ROLLBACK")
        freed = time.monotonic()
        thread.join(10)
        delays.append(taken[0] - freed)
        waiter.execute("ROLLBACK")
        for connection in (holder, waiter):
            connection.close()
    assert statistics.median(delays) < 0.01, delays


def test_the_api_connection_keeps_the_wal_and_its_index(tmp_path: Path) -> None:
    """With no connection open, the last one to close removes the WAL and its index, and the next one must
    create and size them again (space a full disk does not have); the API's held connection keeps them."""
    path = tmp_path / "jobs.sqlite3"
    store = SQLiteJobStore(path)
    store.create(new_job())
    wal, index = path.with_name("jobs.sqlite3-wal"), path.with_name("jobs.sqlite3-shm")
    assert not wal.exists() and not index.exists()
    store.hold_open()
    try:
        # Grown at once to all the blocks it will use, so that a full disk later costs it nothing.
        assert wal.stat().st_size >= 2 * WAL_CHECKPOINT_PAGES * 4096
        before = wal.stat().st_size
        for _ in range(100):
            store.create(new_job())
        assert wal.stat().st_size == before
        assert store.list()[1] == 101
        assert wal.exists() and index.exists()
    finally:
        store.close()
    assert not wal.exists() and not index.exists()


def test_a_database_with_a_rollback_journal_converts_to_wal(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(path, isolation_level=None)
    old.execute("PRAGMA journal_mode=PERSIST")
    old.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, created_at REAL NOT NULL, "
                "doc TEXT NOT NULL)")
    job = new_job()
    old.execute("INSERT INTO jobs VALUES (?, ?, ?, ?)",
                (job.id, job.status.value, job.created_at.timestamp(), job.to_json()))
    old.close()
    store = SQLiteJobStore(path)
    assert store.get(job.id) == job
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    check.close()
