"""The job store contract, run against both backends (SQLite file, real Redis): the state rules every
process relies on to never run a job twice and never lose one."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from pathlib import Path

from adapter_merge.core.context import JobContext
from adapter_merge.core.dispatch import StoreQueue
from adapter_merge.core.jobs import JobRecord, JobStatus, Progress, utcnow
from adapter_merge.core.maintenance import Maintenance
from adapter_merge.core.settings import Settings
from adapter_merge.core.store import JobStore


def new_job(**fields: object) -> JobRecord:
    return JobRecord(id=str(uuid.uuid4()), request={"base_model": "b", "adapters": [{"ref": "a", "weight": 1.0}]},
                     **fields)


def test_create_get_list_pages_and_filters(store: JobStore) -> None:
    jobs = []
    for index in range(5):
        job = new_job(created_at=utcnow() + timedelta(seconds=index))
        store.create(job)
        jobs.append(job)
    assert store.get(jobs[0].id) == jobs[0]
    assert store.get("missing") is None
    page, total = store.list(limit=2, offset=1)
    assert total == 5 and [job.id for job in page] == [jobs[3].id, jobs[2].id]  # newest first
    store.claim(jobs[1].id, "w", 30)
    running, total = store.list([JobStatus.running])
    assert total == 1 and running[0].id == jobs[1].id
    both, total = store.list([JobStatus.running, JobStatus.queued], limit=10, oldest_first=True)
    assert total == 5 and [job.id for job in both] == [job.id for job in jobs]


def test_only_one_of_many_racing_claims_wins(store: JobStore) -> None:
    job = new_job()
    store.create(job)
    winners: list[JobRecord] = []

    def claim(worker: str) -> None:
        claimed = store.claim(job.id, worker, 30)
        if claimed is not None:
            winners.append(claimed)

    threads = [threading.Thread(target=claim, args=(f"w{index}",)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1
    stored = store.get(job.id)
    assert stored is not None and stored.status is JobStatus.running and stored.attempt == 1
    assert stored.worker == winners[0].worker


def test_claim_next_takes_the_oldest_queued(store: JobStore) -> None:
    first, second = new_job(), new_job(created_at=utcnow() + timedelta(seconds=1))
    store.create(second)
    store.create(first)
    assert store.claim_next("w", 30).id == first.id
    assert store.claim_next("w", 30).id == second.id
    assert store.claim_next("w", 30) is None


def test_writes_are_fenced_by_attempt(store: JobStore) -> None:
    job = new_job()
    store.create(job)
    claimed = store.claim(job.id, "w1", 30)
    progress = Progress(tensors_done=1, tensors_total=2, bytes_done=5, bytes_total=10)
    assert store.heartbeat(job.id, claimed.attempt, 30, progress).progress == progress
    assert store.heartbeat(job.id, claimed.attempt + 1, 30) is None  # a stale or future attempt
    assert store.finish(job.id, claimed.attempt + 1, JobStatus.succeeded) is None
    done = store.finish(job.id, claimed.attempt, JobStatus.succeeded)
    assert done.status is JobStatus.succeeded and done.finished_at is not None and done.lease_expires_at is None
    assert store.heartbeat(job.id, claimed.attempt, 30) is None


def test_a_valid_lease_is_not_recovered(store: JobStore) -> None:
    job = new_job()
    store.create(job)
    store.claim(job.id, "w1", 30)
    assert store.recover(job.id, max_recoveries=1) is None
    assert store.get(job.id).status is JobStatus.running


def test_expired_lease_is_recovered_once_then_given_up(store: JobStore) -> None:
    """Leases of zero seconds have run out by the time anyone looks (the store's clock never goes back)."""
    job = new_job()
    store.create(job)
    first = store.claim(job.id, "w1", 0)
    requeued = store.recover(job.id, max_recoveries=1)
    assert requeued.status is JobStatus.queued and requeued.recoveries == 1
    assert "worker w1 stopped renewing its lease (attempt 1)" in requeued.notes
    assert store.recover(job.id, max_recoveries=1) is None  # already recovered by someone
    assert store.heartbeat(job.id, first.attempt, 30) is None  # the dead attempt cannot come back
    second = store.claim(job.id, "w2", 0)
    assert second.attempt == 2
    failed = store.recover(job.id, max_recoveries=1)
    assert failed.status is JobStatus.failed and "lost its worker 2 times" in failed.error["detail"]


def test_expired_lease_of_a_job_being_cancelled_ends_it_cancelled(store: JobStore) -> None:
    job = new_job()
    store.create(job)
    store.claim(job.id, "w1", 0)
    assert store.request_cancel(job.id).cancel_requested
    cancelled = store.recover(job.id, max_recoveries=1)
    assert cancelled.status is JobStatus.cancelled and cancelled.finished_at is not None


def test_cancel_queued_is_immediate_running_is_a_request(store: JobStore) -> None:
    queued, running = new_job(), new_job()
    store.create(queued)
    store.create(running)
    assert store.request_cancel(queued.id).status is JobStatus.cancelled
    assert store.claim(queued.id, "w", 30) is None
    store.claim(running.id, "w", 30)
    flagged = store.request_cancel(running.id)
    assert flagged.status is JobStatus.running and flagged.cancel_requested
    assert store.heartbeat(running.id, flagged.attempt, 30).cancel_requested


def test_delete_only_finished(store: JobStore) -> None:
    job = new_job()
    store.create(job)
    assert not store.delete(job.id)
    store.request_cancel(job.id)
    assert store.delete(job.id)
    assert store.get(job.id) is None and store.list()[1] == 0
    assert not store.delete(job.id)


def test_retention_deletes_old_results_and_their_files(tmp_path: Path) -> None:
    context = JobContext.open(Settings(data_dir=tmp_path, retention_seconds=3600))
    store, layout = context.store, context.layout
    old, recent = new_job(), new_job()
    for job, age in ((old, timedelta(hours=2)), (recent, timedelta(minutes=5))):
        store.create(job)
        store.request_cancel(job.id)
        store.update(job.id, lambda record, now, age=age: record.model_copy(
            update={"finished_at": utcnow() - age}))
        layout.result_dir(job.id, 1).mkdir(parents=True)
        (layout.result_dir(job.id, 1) / "model.safetensors").write_bytes(b"x")
    assert Maintenance(context, StoreQueue(tmp_path)).clean() == [old.id]
    assert store.get(old.id) is None and not layout.job_artifacts(old.id).exists()
    assert store.get(recent.id) is not None and layout.job_artifacts(recent.id).exists()
