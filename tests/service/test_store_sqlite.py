"""The embedded store's SQLite file: reads never wait for a writer, however long its commit takes, the API's
connection keeps the WAL in place, and a database from a version that used a rollback journal converts."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from adapter_merge.core.jobs import JobStatus, Progress
from adapter_merge.core.store.local import SQLiteJobStore
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


def test_a_writer_waits_for_the_lock_and_lands_once_it_is_free(tmp_path: Path) -> None:
    """Writers queue for the write lock without SQLite's growing sleeps: a heartbeat lands within
    milliseconds of the lock coming free."""
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    store.create(new_job())
    job = store.claim_next("w1", lease_seconds=60)
    assert job is not None
    holder = sqlite3.connect(store.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    landed: list[float] = []

    def beat() -> None:
        store.heartbeat(job.id, job.attempt, None, Progress(phase="merging", tensors_done=1, tensors_total=2))
        landed.append(time.monotonic())

    thread = threading.Thread(target=beat)
    thread.start()
    time.sleep(0.3)  # the heartbeat has been refused the lock for a while, so SQLite's own timeout would sleep long
    assert not landed
    freed = time.monotonic()
    holder.execute("COMMIT")
    holder.close()
    thread.join(10)
    assert landed and landed[0] - freed < 0.05
    stored = store.get(job.id)
    assert stored is not None and stored.progress.tensors_done == 1


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
        store.create(new_job())
        assert len(store.list()[0]) == 2
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
