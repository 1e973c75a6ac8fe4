"""The reaper against both stores (SQLite file, real Redis), in process: listings of more than one page, leases
judged only once the store has answered steadily, and lost messages published again once per grace period."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from adapter_merge.core.jobs import JobRecord, JobStatus, utcnow
from adapter_merge.core.layout import DataLayout
from adapter_merge.core.maintenance import Maintenance
from adapter_merge.core.settings import Settings
from adapter_merge.core.store import JobStore
from adapter_merge.core.store.base import PAGE
from tests.service.harness import wait_for

MANY = 2 * PAGE + 57
"""More than two pages."""


class Spy:
    """A dispatcher that remembers what it was asked to publish."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self._lock = threading.Lock()

    def submit(self, job_id: str) -> None:
        with self._lock:
            self.submitted.append(job_id)

    def ping(self) -> None:
        return None


def reaper(store: JobStore, tmp_path: Path, **settings: Any) -> tuple[Maintenance, Spy]:
    context = SimpleNamespace(store=store, layout=DataLayout(tmp_path / "data"), settings=Settings(**settings))
    spy = Spy()
    return Maintenance(context, spy), spy  # type: ignore[arg-type]


def new_job(created_at: datetime, **fields: Any) -> JobRecord:
    return JobRecord(id=str(uuid.uuid4()), request={"base_model": "b", "adapters": [{"ref": "a", "weight": 1.0}]},
                     created_at=created_at, queued_at=created_at, **fields)


def create_running(store: JobStore, count: int, lease_expires_at: float, same_time: int = 0) -> list[str]:
    """`count` running jobs; the first `same_time` of them share one creation time (ties in the order)."""
    start = utcnow() - timedelta(hours=1)
    ids = []
    for index in range(count):
        created = start if index < same_time else start + timedelta(milliseconds=index)
        job = new_job(created, status=JobStatus.running, attempt=1, worker=f"w{index}",
                      lease_expires_at=lease_expires_at)
        store.create(job)
        ids.append(job.id)
    return ids


@pytest.mark.parametrize("oldest_first", [True, False])
def test_all_jobs_sees_each_job_once_while_others_leave_the_listing(store: JobStore, oldest_first: bool) -> None:
    """Jobs that finish while a reaper pages through the running ones must not make it skip any other."""
    ids = create_running(store, MANY, lease_expires_at=0, same_time=PAGE + 10)  # a page boundary inside a tie
    seen: list[str] = []
    for job in store.all_jobs([JobStatus.running], oldest_first=oldest_first):
        seen.append(job.id)
        if len(seen) == PAGE:  # the first page has been handed out: some of it finishes meanwhile
            for job_id in seen[:25]:
                store.update(job_id, lambda record, now: record.model_copy(update={"status": JobStatus.succeeded}))
    assert len(seen) == len(set(seen)) == MANY and set(seen) == set(ids)


def test_the_reaper_recovers_every_expired_job_however_many_pages(store: JobStore, tmp_path: Path) -> None:
    expired = create_running(store, MANY, lease_expires_at=0)
    alive = create_running(store, 3, lease_expires_at=store.now() + 3600)
    maintenance, spy = reaper(store, tmp_path, lease_seconds=1.0, heartbeat_seconds=0.25, poll_seconds=0.05)
    started = time.monotonic()
    # A reaper that has just started judges no lease until the store has answered it for a whole lease.
    assert maintenance.reap() == []
    requeued = wait_for(maintenance.reap, 10, "the reaper to recover the expired jobs")
    assert time.monotonic() - started >= 1.0
    assert sorted(requeued) == sorted(expired) == sorted(spy.submitted)
    assert {store.get(job_id).status for job_id in expired} == {JobStatus.queued}
    assert {store.get(job_id).status for job_id in alive} == {JobStatus.running}
    assert maintenance.reap() == [] and len(spy.submitted) == MANY


def test_a_lost_message_is_published_again_once_per_grace_period(store: JobStore, tmp_path: Path) -> None:
    grace = 60.0
    now = datetime.fromtimestamp(store.now(), UTC)
    stranded = new_job(now - timedelta(seconds=2 * grace))
    recent = new_job(now)
    running = new_job(now - timedelta(seconds=2 * grace), status=JobStatus.running, attempt=1,
                      lease_expires_at=store.now() + 3600)
    for job in (stranded, recent, running):
        store.create(job)
    # Three reapers (say two API processes and a worker) at once: one message in all.
    # Distributed mode (a Redis URL) is what makes reapers republish; the store under test is passed in itself.
    reapers = [reaper(store, tmp_path, redis_url="redis://127.0.0.1:1/0", requeue_grace_seconds=grace)
               for _ in range(3)]
    threads = [threading.Thread(target=maintenance.reap) for maintenance, _ in reapers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [job_id for _, spy in reapers for job_id in spy.submitted] == [stranded.id]
    republished_at = store.get(stranded.id).queued_at
    assert republished_at >= now

    for maintenance, _ in reapers:  # within the same grace period: nothing more
        maintenance.reap()
    assert sum(len(spy.submitted) for _, spy in reapers) == 1

    # A grace period later it is still queued: one more message.
    store.update(stranded.id, lambda record, clock: record.model_copy(
        update={"queued_at": republished_at - timedelta(seconds=grace)}))
    for maintenance, _ in reapers:
        maintenance.reap()
    assert sorted(job_id for _, spy in reapers for job_id in spy.submitted) == [stranded.id] * 2

    # Embedded mode: the store is the queue, there is no message to lose.
    store.update(stranded.id, lambda record, clock: record.model_copy(
        update={"queued_at": record.queued_at - timedelta(seconds=2 * grace)}))
    embedded, spy = reaper(store, tmp_path, requeue_grace_seconds=grace)
    embedded.reap()
    assert spy.submitted == []
