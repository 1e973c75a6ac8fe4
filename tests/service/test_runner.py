"""The job runner in-process, for what the process-level tests cannot stage: a worker that is alive but has
lost its lease (a network partition, a long pause) while its job was re-run elsewhere."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

from adapter_merge.core.context import JobContext
from adapter_merge.core.jobs import JobRecord, JobStatus
from adapter_merge.core.request import MergeRequest
from adapter_merge.core.settings import Settings
from adapter_merge.worker.runner import JobRunner
from tests.service.conftest import ModelSet
from tests.service.harness import wait_for


def test_a_run_that_lost_its_lease_stops_and_touches_nothing(models: ModelSet, big_request: dict,
                                                             tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, model_roots=[models.root], lease_seconds=6, heartbeat_seconds=1,
                        poll_seconds=0.2)
    context = JobContext.open(settings)
    store = context.store
    job = JobRecord(id=str(uuid.uuid4()), request=MergeRequest(**big_request))
    store.create(job)
    runner = JobRunner(context)
    claimed = store.claim(job.id, "zombie", settings.lease_seconds)
    outcome: list[JobRecord | None] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.execute(claimed)))
    thread.start()
    wait_for(lambda: store.get(job.id).progress.tensors_done > 0 or not thread.is_alive(), 60, "merge progress")
    assert thread.is_alive(), outcome

    # Its lease runs out (the worker looks dead), a reaper re-queues the job and another worker claims it.
    store.update(job.id, lambda record, now: record.model_copy(update={"lease_expires_at": now - 1}))
    assert store.recover(job.id, settings.max_recoveries).status is JobStatus.queued
    rerun = store.claim(job.id, "successor", settings.lease_seconds)
    rerun_scratch = runner.layout.attempt_dir(job.id, rerun.attempt)
    rerun_scratch.mkdir(parents=True)

    thread.join(60)
    assert not thread.is_alive() and outcome == [None]  # it noticed, stopped, and reported nothing
    current = store.get(job.id)
    assert (current.status, current.attempt, current.worker) == (JobStatus.running, 2, "successor")
    assert not runner.layout.result_dir(job.id, 1).exists()
    assert not runner.layout.attempt_dir(job.id, 1).exists()
    assert rerun_scratch.is_dir()  # the successor's scratch was left alone
