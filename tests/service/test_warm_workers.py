"""A job starts without the cost of a process start: the process that will run it has imported the engine and
torch before the job arrives (a Celery pool process at `worker_process_init`, the embedded worker's merge
process as soon as the previous one has exited), and the embedded worker is woken by the API's bell on
submission instead of finding the job at its next poll of the store.

Readiness is read from what each merge process logs once the engine is loaded, and the wake-up from a poll
interval far longer than any test waits, so nothing here depends on a race being won.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil

from adapter_merge.core.dispatch import BELL_NAME, BellListener, StoreQueue
from tests.service.conftest import ModelSet
from tests.service.harness import (
    FINISHED,
    ready_merge_processes,
    running_cluster,
    service_env,
    serving,
    torch_loaded,
    wait_for,
)

SLOW_POLL = {"MERGE_POLL_SECONDS": "60", "MERGE_LEASE_SECONDS": "240", "MERGE_HEARTBEAT_SECONDS": "10"}
"""Settings under which a job found by polling would wait up to a minute."""


def test_bell_wakes_a_waiting_worker_and_never_holds_up_a_submission(tmp_path: Path) -> None:
    queue = StoreQueue(tmp_path)
    queue.submit("before-any-worker")  # nobody listens: nothing happens, nothing fails
    (tmp_path / BELL_NAME).write_text("left behind")  # not a FIFO: the worker puts its own in its place
    listener = BellListener(tmp_path / BELL_NAME)
    try:
        assert not listener.wait(0)
        queue.submit("a")
        queue.submit("b")
        assert listener.wait(60)  # rung before the wait: it returns at once
        assert not listener.wait(0)  # and both rings are answered
        threading.Timer(0.2, queue.submit, args=["c"]).start()
        started = time.monotonic()
        assert listener.wait(60) and time.monotonic() - started < 30
        for _ in range(70_000):  # more than a FIFO holds: a full bell never blocks a submission
            queue.submit("flood")
        assert listener.wait(0)
    finally:
        listener.close()


def test_embedded_job_runs_in_a_process_ready_before_it_and_starts_on_submission(
        models: ModelSet, tmp_path: Path, small_request: dict) -> None:
    """Two workers, each waiting on a poll interval of a minute: only the bell can start the job within seconds.
    The job runs in a merge process that had loaded the engine before it was submitted; the other worker's,
    told to claim the same job and finding none, stays ready; the worker that ran it gets a new one, ready as
    well (a process per job: its memory goes back to the system)."""
    env = service_env(tmp_path / "data", models.root, MERGE_WORKER_CONCURRENCY="2", **SLOW_POLL)
    with serving(env, tmp_path / "server.log") as (proc, api):
        ready = wait_for(lambda: len(ready_merge_processes(proc)) == 2 and ready_merge_processes(proc), 60,
                         lambda: f"a ready merge process per worker: {proc.tail()}")
        job = api.wait(api.submit(small_request)["id"], FINISHED, timeout=60)
        assert job["status"] == "succeeded", job["error"]
        ran = int(job["worker"].rsplit(":", 1)[1])
        assert ran in ready
        assert job["timings"]["queued"] < 20, job["timings"]
        after = wait_for(lambda: len(ready_merge_processes(proc) - {ran}) == 2 and ready_merge_processes(proc), 60,
                         "the next merge process, ready")
        assert ready - {ran} < after  # the other worker's process is the one it had
        others = [child.pid for child in psutil.Process(proc.pid).children() if child.pid not in after]
        assert others and not any(torch_loaded(pid) for pid in (proc.pid, *others))  # workers, preflight


def test_celery_job_runs_in_a_pool_process_ready_before_it(models: ModelSet, tmp_path: Path,
                                                           redis_namespace: dict[str, str],
                                                           small_request: dict) -> None:
    """With one job per pool process, Celery forks the next process as soon as the last one exits; it loads the
    engine before it reports ready, so the job after it does not wait for that either."""
    env = service_env(tmp_path / "data", models.root, **redis_namespace)
    with running_cluster(tmp_path, env, [env]) as (_, api, [worker]):
        ready = wait_for(lambda: ready_merge_processes(worker), 60, lambda: f"a ready pool process: {worker.tail()}")
        job = api.wait(api.submit(small_request)["id"], FINISHED, timeout=60)
        assert job["status"] == "succeeded", job["error"]
        ran = int(job["worker"].rsplit(":", 1)[1])
        assert ran in ready
        wait_for(lambda: ready_merge_processes(worker) - {ran}, 60, "the next pool process, ready")
        assert not torch_loaded(worker.pid)
