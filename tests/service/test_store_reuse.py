"""The store primitives behind reuse and Idempotency-Key, on both backends (SQLite file, real Redis): the digest
index, idempotency records with their expiry, the waiting lock; and the data layout's shared results."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from adapter_merge.core.jobs import JobStatus, utcnow
from adapter_merge.core.layout import DataLayout
from adapter_merge.core.store import JobStore
from adapter_merge.core.store.base import IdempotencyRecord, LockBusy
from adapter_merge.core.store.local import SQLiteJobStore
from tests.service.test_store import new_job

DIGEST, OTHER = "a" * 64, "b" * 64


def test_jobs_are_found_by_tenant_and_digest(store: JobStore) -> None:
    older = new_job(tenant="t1", request_digest=DIGEST)
    newer = new_job(tenant="t1", request_digest=DIGEST, created_at=utcnow() + timedelta(seconds=1))
    elsewhere = [new_job(tenant="t2", request_digest=DIGEST), new_job(tenant="t1", request_digest=OTHER),
                 new_job(tenant="t1")]
    for job in (older, newer, *elsewhere):
        store.create(job)
    everything = list(JobStatus)
    assert [job.id for job in store.with_digest("t1", DIGEST, everything)] == [newer.id, older.id]
    assert [job.id for job in store.with_digest("t2", DIGEST, everything)] == [elsewhere[0].id]
    store.claim(older.id, "w", 30)
    assert [job.id for job in store.with_digest("t1", DIGEST, [JobStatus.running])] == [older.id]
    assert store.with_digest("t1", DIGEST, [JobStatus.succeeded]) == []
    store.finish(older.id, 1, JobStatus.succeeded)
    assert [job.id for job in store.with_digest("t1", DIGEST, [JobStatus.succeeded])] == [older.id]
    assert store.delete(older.id)
    assert [job.id for job in store.with_digest("t1", DIGEST, everything)] == [newer.id]


def test_an_idempotency_key_is_claimed_once_answered_and_kept(store: JobStore) -> None:
    assert store.claim_key("t1", "key:1", "body-1", "first", 30) is None
    processing = IdempotencyRecord("body-1", "first")
    assert store.claim_key("t1", "key:1", "body-2", "second", 30) == processing
    assert store.claim_key("t2", "key:1", "body-2", "third", 30) is None  # keys are per tenant
    store.settle_key("t1", "key:1", "second", "job-x", 202, 30)  # not the owner: no effect
    store.release_key("t1", "key:1", "second")
    assert store.claim_key("t1", "key:1", "body-1", "again", 30) == processing
    store.settle_key("t1", "key:1", "first", "job-1", 202, 30)
    answered = IdempotencyRecord("body-1", "first", "job-1", 202)
    assert store.claim_key("t1", "key:1", "body-1", "again", 30) == answered
    store.release_key("t1", "key:1", "first")  # an answered key stays answered
    assert store.claim_key("t1", "key:1", "body-1", "again", 30) == answered


def test_a_failed_request_gives_its_key_up(store: JobStore) -> None:
    assert store.claim_key("t1", "k", "body", "first", 30) is None
    store.release_key("t1", "k", "first")
    assert store.claim_key("t1", "k", "body", "second", 30) is None


def test_idempotency_records_expire(store: JobStore) -> None:
    """A claim held by a request that died runs out after its hold; an answer after its time to live."""
    assert store.claim_key("t1", "held", "body", "dead", 0.2) is None
    assert store.claim_key("t1", "answered", "body", "done", 30) is None
    store.settle_key("t1", "answered", "done", "job-1", 202, 0.2)
    time.sleep(0.3)
    assert store.claim_key("t1", "held", "body", "new", 30) is None
    assert store.claim_key("t1", "answered", "other body", "new", 30) is None


def test_sqlite_sweeps_expired_keys(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    for index in range(5):
        store.claim_key("t1", f"old-{index}", "body", "owner", 0.01)
    time.sleep(0.05)
    store.claim_key("t1", "new", "body", "owner", 30)
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        assert [row[0] for row in db.execute("SELECT key FROM idempotency_keys")] == ["new"]


def test_sqlite_store_from_before_digests_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as db:  # the schema as it was before request digests
        db.executescript("""
            CREATE TABLE jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, created_at REAL NOT NULL, doc TEXT NOT NULL,
                               tenant TEXT NOT NULL DEFAULT 'default');
            CREATE TABLE locks (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL);
        """)
        old = new_job()
        db.execute("INSERT INTO jobs (id, status, created_at, doc) VALUES (?, 'queued', ?, ?)",
                   (old.id, old.created_at.timestamp(), old.to_json()))
    store = SQLiteJobStore(path)
    assert store.get(old.id) == old
    fresh = new_job(request_digest=DIGEST)
    store.create(fresh)
    assert [job.id for job in store.with_digest("default", DIGEST, list(JobStatus))] == [fresh.id]
    assert store.claim_key("default", "k", "body", "owner", 30) is None
    with sqlite3.connect(path) as db:
        plan = " ".join(str(row) for row in db.execute(
            "EXPLAIN QUERY PLAN SELECT doc FROM jobs WHERE tenant = ? AND request_digest = ?", ("default", DIGEST)))
    assert "jobs_tenant_digest_created" in plan


def test_locked_waits_for_the_holder_then_gives_up(store: JobStore) -> None:
    entered = threading.Event()
    with store.locked("reuse:t:x", 30, wait=1):
        def contender() -> None:
            with store.locked("reuse:t:x", 30, wait=5):
                entered.set()

        thread = threading.Thread(target=contender)
        thread.start()
        with pytest.raises(LockBusy), store.locked("reuse:t:x", 30, wait=0.2):
            pass
        assert not entered.is_set()
    thread.join(5)
    assert entered.is_set()


def write_result(layout: DataLayout, job_id: str, attempt: int) -> Path:
    folder = layout.result_dir(job_id, attempt)
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights" * 1000)
    (folder / "sub" / "config.json").write_text("{}")
    return folder


def test_share_links_every_file_and_survives_deleting_either_job(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    source = write_result(layout, "first", 2)
    shared = layout.share("first", 2, "second")
    assert shared == layout.result_dir("second", 0)
    assert sorted(str(p.relative_to(shared)) for p in shared.rglob("*")) == ["model.safetensors", "sub",
                                                                            "sub/config.json"]
    assert os.stat(shared / "model.safetensors").st_ino == os.stat(source / "model.safetensors").st_ino
    assert not [p for p in layout.job_artifacts("second").iterdir() if p.name.startswith(".")]
    layout.remove_job("first")
    assert (shared / "model.safetensors").read_bytes() == b"weights" * 1000
    again = layout.share("second", 0, "third", 1)  # a job that shares what it was shared
    layout.remove_job("second")
    assert (again / "sub" / "config.json").read_text() == "{}"


def test_share_of_a_gone_result_leaves_nothing(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    with pytest.raises(FileNotFoundError):
        layout.share("missing", 1, "second")
    assert not layout.result_dir("second", 0).exists()
    assert not list(layout.job_artifacts("second").iterdir())


def test_share_copies_across_filesystems(tmp_path: Path) -> None:
    """A source on another filesystem (here /dev/shm, a tmpfs) cannot be linked: its files are copied."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem at /dev/shm")
    layout = DataLayout(tmp_path)
    elsewhere = DataLayout(Path(os.path.realpath(shm)) / f"share-test-{os.getpid()}-{tmp_path.name}")
    try:
        source = write_result(elsewhere, "first", 1)
        layout.job_artifacts("first").mkdir(parents=True)
        layout.result_dir("first", 1).symlink_to(source, target_is_directory=True)
        shared = layout.share("first", 1, "second")
        assert (shared / "model.safetensors").read_bytes() == b"weights" * 1000
        assert os.stat(shared / "model.safetensors").st_ino != os.stat(source / "model.safetensors").st_ino
    finally:
        shutil.rmtree(elsewhere.root, ignore_errors=True)
