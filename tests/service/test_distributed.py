"""Distributed mode: the API on Redis and two real `adapter-merge worker` (Celery) processes.

The central test kills a whole worker (main process and pool child, SIGKILL) in the middle of a merge and
checks that the job is re-run on the other worker, within the documented bound, with a correct result. It
runs last: the cluster keeps one worker afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapter_merge.core.settings import Settings
from tests.service.checks import assert_no_leftovers, assert_result_matches, cancel_running, running_with_progress
from tests.service.conftest import ModelSet
from tests.service.harness import FINISHED, Api, Proc, running_cluster, service_env, wait_for


@dataclass
class Cluster:
    api: Api
    server: Proc
    workers: list[Proc]
    data_dir: Path
    settings: Settings
    """What every process of the cluster reads from its environment."""

    def worker_running(self, job: dict) -> Proc:
        """The worker process group whose pool child holds the job."""
        pid = int(job["worker"].rsplit(":", 1)[1])
        return next(worker for worker in self.workers if pid in worker.group_pids())

    def logged_by(self, needle: str) -> list[Proc]:
        return [worker for worker in self.workers if needle in worker.log_text()]


@pytest.fixture(scope="module")
def cluster(models: ModelSet, tmp_path_factory: pytest.TempPathFactory,
            redis_namespace: dict[str, str]) -> Iterator[Cluster]:
    data_dir = tmp_path_factory.mktemp("distributed-data")
    env = service_env(data_dir, models.root, **redis_namespace)
    settings = Settings(**{key.removeprefix("MERGE_").lower(): value for key, value in env.items()
                           if key.startswith("MERGE_")})
    with running_cluster(data_dir, env, [env, env]) as (server, api, workers):
        yield Cluster(api, server, workers, data_dir, settings)


@pytest.fixture(scope="module")
def small_job(cluster: Cluster, small_request: dict) -> dict:
    job = cluster.api.wait(cluster.api.submit(small_request)["id"], FINISHED, timeout=60)
    assert job["status"] == "succeeded", job["error"]
    return job


def test_readyz_reports_redis(cluster: Cluster) -> None:
    body = cluster.api.http.get("/readyz").json()
    assert body["mode"] == "distributed"
    assert body["checks"] == {"store": "ok", "broker": "ok", "data_dir": "ok", "workers": "ok"}


def test_merge_end_to_end(cluster: Cluster, small_job: dict, small_reference: Path, tmp_path: Path) -> None:
    assert small_job["attempts"] == 1
    assert small_job["progress"]["tensors_done"] == small_job["progress"]["tensors_total"]
    assert set(small_job["timings"]) == {"queued", "download", "resolve", "merge", "write", "publish", "total"}
    assert_result_matches(cluster.api, small_job, small_reference, tmp_path, compare_tensors=True)
    assert_no_leftovers(cluster.data_dir, small_job["id"])


def test_duplicate_delivery_is_a_no_op(cluster: Cluster, small_job: dict) -> None:
    """A second message for a finished job reaches a worker, which finds the job not queued and returns without
    running anything: the job record stays exactly as it was."""
    from adapter_merge.service.publisher import CeleryPublisher

    job_id = small_job["id"]
    nothing_to_do = f"job {job_id} is not queued; nothing to do"
    assert not cluster.logged_by(nothing_to_do)  # the first delivery did run it
    CeleryPublisher(cluster.settings).submit(job_id)
    consumers = wait_for(lambda: cluster.logged_by(nothing_to_do), 30,
                         lambda: f"a worker to log {nothing_to_do!r}: {[w.tail() for w in cluster.workers]}")
    assert len(consumers) == 1 and consumers[0].log_text().count(nothing_to_do) == 1
    assert not cluster.logged_by(f"job {job_id}: attempt 2 starts")
    assert cluster.api.job(job_id) == small_job


def test_cancel_running_job(cluster: Cluster, big_request: dict) -> None:
    job = cluster.api.submit(big_request)
    cluster.api.wait(job["id"], running_with_progress, timeout=60)
    cancel_running(cluster.api, job["id"], cluster.data_dir)


def test_sigkill_of_a_worker_mid_merge(cluster: Cluster, big_request: dict, big_reference: Path) -> None:
    api = cluster.api
    job = api.submit(big_request)
    running = api.wait(job["id"], lambda j: j["status"] == "running" and j["progress"]["tensors_done"] > 20,
                       timeout=60)
    victim = cluster.worker_running(running)
    survivor = next(worker for worker in cluster.workers if worker is not victim)
    victim.kill_group()
    killed_at = time.monotonic()
    cluster.workers.remove(victim)
    victim.reap_group()

    rerun_started: list[float] = []
    rerun_on_survivor: list[bool] = []

    def note_rerun(current: dict) -> None:
        if current["attempts"] >= 2 and current["status"] == "running" and not rerun_started:
            rerun_started.append(time.monotonic() - killed_at)
            rerun_on_survivor.append(int(current["worker"].rsplit(":", 1)[1]) in survivor.group_pids())

    done = api.wait(job["id"], FINISHED, timeout=150, on_poll=note_rerun)
    recovered_in = time.monotonic() - killed_at
    assert rerun_started, done
    print(f"\n[measure] SIGKILL -> rerun started {rerun_started[0]:.1f} s, -> succeeded {recovered_in:.1f} s")
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2 and rerun_on_survivor == [True]
    assert rerun_started[0] <= cluster.settings.recovery_bound_seconds + 5
    assert recovered_in <= 120
    assert any("stopped renewing its lease" in note for note in done["notes"])
    assert_result_matches(api, done, big_reference)
    assert_no_leftovers(cluster.data_dir, job["id"])
