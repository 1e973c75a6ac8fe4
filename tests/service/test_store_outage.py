"""A job store outage longer than a lease does not restart work whose worker is alive (distributed mode).

The API server and the worker reach Redis through TCP relays of their own, which the test cuts (connections
closed, new ones dropped at once: the store's host is down) and restores. The worker's link comes back last,
after the API's reaper has already seen the store again with the job's lease run out by the store's clock: the
worst case for a reaper that judged leases as soon as it could. The job must end in its first attempt.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapter_merge.core.store.redis import RedisJobStore
from tests.redis_server import RedisServer
from tests.service.checks import assert_no_leftovers, assert_result_matches
from tests.service.conftest import ModelSet
from tests.service.harness import (
    FINISHED,
    TEST_TIMINGS,
    Api,
    Proc,
    launch_server,
    launch_worker,
    service_env,
    stop_all,
    wait_for,
    wait_healthy,
    wait_worker_ready,
)

LEASE_SECONDS = float(TEST_TIMINGS["MERGE_LEASE_SECONDS"])


class Link:
    """A TCP relay to Redis. `cut()` closes every connection through it and drops new ones at once until
    `restore()`, so clients fail fast, as when the store's host is down."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name=f"link-{self.port}").start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if not self.up.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._open |= {client, upstream}
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        for end in (source, target):
            self._drop(end)

    def _drop(self, end: socket.socket) -> None:
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)
        end.close()
        with self._lock:
            self._open.discard(end)

    def cut(self) -> None:
        self.up.clear()
        with self._lock:
            ends = list(self._open)
        for end in ends:
            self._drop(end)

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.listener.close()
        self.cut()


@dataclass
class Cluster:
    api: Api
    server: Proc
    worker: Proc
    api_link: Link
    worker_link: Link
    store: RedisJobStore
    """Straight to Redis, past the relays: what the store holds while the others cannot see it."""
    data_dir: Path


@pytest.fixture(scope="module")
def cluster(models: ModelSet, tmp_path_factory: pytest.TempPathFactory,
            redis_namespace: dict[str, str], redis_server: RedisServer) -> Iterator[Cluster]:
    data_dir = tmp_path_factory.mktemp("outage-data")
    api_link, worker_link = Link(("127.0.0.1", redis_server.port)), Link(("127.0.0.1", redis_server.port))

    def env(link: Link) -> dict[str, str]:
        return service_env(data_dir, models.root, **{
            **redis_namespace, "MERGE_REDIS_URL": f"redis://127.0.0.1:{link.port}/0"})

    server, api = launch_server(env(api_link), data_dir / "server.log")
    worker = launch_worker(env(worker_link), data_dir / "worker.log")
    store = RedisJobStore(redis_server.url(), redis_namespace["MERGE_REDIS_PREFIX"])
    try:
        wait_healthy(server, api)
        wait_worker_ready(worker)
        yield Cluster(api, server, worker, api_link, worker_link, store, data_dir)
    finally:
        api.close()
        for link in (api_link, worker_link):
            link.restore()
        stop_all([server, worker])
        for link in (api_link, worker_link):
            link.close()
        store.close()


def test_an_outage_longer_than_the_lease_does_not_restart_a_running_job(
        cluster: Cluster, big_request: dict, big_reference: Path) -> None:
    api, store = cluster.api, cluster.store
    job = api.submit(big_request)
    api.wait(job["id"], lambda current: current["status"] == "running" and current["progress"]["tensors_done"] > 0,
             timeout=60)
    cluster.api_link.cut()
    cluster.worker_link.cut()
    lease = store.get(job["id"]).lease_expires_at  # the last renewal that landed before the cut
    outage_started = store.now()
    # The store keeps running: wait by its clock until the worker's lease has run out and the outage has lasted
    # a whole lease (the last renewal landed up to a heartbeat before the cut, so the first alone is shorter).
    wait_for(lambda: store.now() > max(lease, outage_started + LEASE_SECONDS) + 0.2, LEASE_SECONDS + 5,
             "the lease to run out by the store's clock")

    seen = cluster.server.log_text().count("judging no lease")
    cluster.api_link.restore()  # the API's reaper sees the store again, the worker cannot yet
    wait_for(lambda: cluster.server.log_text().count("judging no lease") > seen, 10,
             lambda: f"the API's reaper to see the store again: {cluster.server.tail()}")
    current = store.get(job["id"])
    assert current.status == "running" and current.attempt == 1 and current.lease_expires_at == lease
    cluster.worker_link.restore()
    outage = store.now() - outage_started
    print(f"\n[measure] worker cut off from the store for {outage:.1f} s (lease {LEASE_SECONDS:.0f} s)")
    assert outage > LEASE_SECONDS

    done = api.wait(job["id"], FINISHED, timeout=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 1 and not any("stopped renewing" in note for note in done["notes"]), done
    assert "no longer owns the job" not in cluster.worker.log_text()
    assert_result_matches(api, done, big_reference)
    assert_no_leftovers(cluster.data_dir, job["id"])
