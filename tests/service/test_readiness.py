"""`/readyz` says whether a worker is there to run jobs: in distributed mode by the workers' heartbeats in the
store (real Celery workers started, stopped and killed), in embedded mode by the local worker process the
server supervises (killed under it)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil

from adapter_merge.core.store import JobStore
from tests.loopback import wait_for
from tests.service.conftest import ModelSet
from tests.service.harness import TEST_TIMINGS, Api, Proc, service_env, serving, start_server, start_worker

LEASE = float(TEST_TIMINGS["MERGE_LEASE_SECONDS"])


def workers_check(api: Api) -> tuple[int, str]:
    """The readiness status and what its workers check says."""
    response = api.http.get("/readyz")
    return response.status_code, response.json()["checks"].get("workers", "")


def wait_readiness(api: Api, ready: bool, timeout: float) -> float:
    """Seconds until /readyz answers 200 (ready) or 503 naming the workers check (not ready)."""
    started = time.monotonic()
    seen: list[tuple[int, str]] = []

    def reached() -> bool:
        seen[:] = [workers_check(api)]
        status, check = seen[0]
        return status == 200 and check == "ok" if ready else status == 503 and check != "ok"

    wait_for(reached, timeout, lambda: f"readiness {ready}; last seen {seen}")
    return time.monotonic() - started


def test_worker_presence_contract(store: JobStore) -> None:
    """Both stores: a worker counts as alive for the time it announced, by the store's clock, and not once it
    withdrew."""
    assert store.live_workers() == []
    store.worker_seen("host-a:1", 30)
    store.worker_seen("host-b:2", 0.3)
    assert store.live_workers() == ["host-a:1", "host-b:2"]
    store.worker_seen("host-a:1", 0)
    wait_for(lambda: store.live_workers() == [], 5, "the short heartbeat to run out")
    store.worker_seen("host-a:1", 30)  # back again
    assert store.live_workers() == ["host-a:1"]


def test_distributed_readiness_follows_the_workers(models: ModelSet, tmp_path: Path,
                                                   redis_namespace: dict[str, str]) -> None:
    env = service_env(tmp_path / "data", models.root, **redis_namespace)
    server, api = start_server(env, tmp_path / "server.log")
    workers: list[Proc] = []
    try:
        status, check = workers_check(api)
        assert status == 503 and "no worker has been seen" in check, check
        problem = api.http.get("/readyz").json()
        assert "workers" in problem["detail"] and problem["checks"]["store"] == "ok"

        workers.append(start_worker(env, tmp_path / "worker-1.log"))
        print(f"\n[measure] worker ready -> API ready: {wait_readiness(api, True, 10):.2f} s")
        assert workers[0].stop() == 0  # a clean stop withdraws at once
        print(f"[measure] worker stopped -> not ready: {wait_readiness(api, False, 2):.2f} s")

        workers.append(start_worker(env, tmp_path / "worker-2.log"))
        wait_readiness(api, True, 10)
        workers[1].kill_group()  # no chance to withdraw: its heartbeat runs out
        gone = wait_readiness(api, False, LEASE + 3)
        print(f"[measure] worker SIGKILLed -> not ready: {gone:.2f} s (heartbeats valid {LEASE:g} s)")
        assert gone > LEASE / 2  # it was the heartbeat running out, not a withdrawal
    finally:
        api.close()
        for worker in workers:
            worker.stop()
        assert server.stop() == 0, server.tail()


def embedded_worker(server: Proc) -> psutil.Process:
    children = psutil.Process(server.pid).children()
    return next(child for child in children if "adapter_merge.worker.embedded" in child.cmdline())


def test_embedded_readiness_follows_the_local_worker(models: ModelSet, tmp_path: Path) -> None:
    with serving(service_env(tmp_path / "data", models.root), tmp_path / "server.log") as (server, api):
        wait_readiness(api, True, 10)
        victim = embedded_worker(server)
        os.kill(victim.pid, signal.SIGKILL)
        wait_readiness(api, False, 5)
        status, check = workers_check(api)
        assert status == 503 and f"local worker process {victim.pid} exited" in check, check
        print(f"\n[measure] embedded worker restarted, ready again after {wait_readiness(api, True, 15):.2f} s")
        assert embedded_worker(server).pid != victim.pid

