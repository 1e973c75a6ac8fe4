"""Prometheus metrics as an operator scrapes them: the API's `/metrics` of a real embedded server (its own
HTTP metrics, the store's gauges and the job histograms its worker processes wrote), a real Celery worker's
`--metrics-port`, the leases a reaper recovered, who may scrape, and the Grafana dashboard's queries
against a real scrape."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from adapter_merge.core.settings import Settings
from adapter_merge.service.app import create_app
from tests.loopback import free_port, wait_for
from tests.service.checks import problem
from tests.service.conftest import ModelSet
from tests.service.harness import (
    FINISHED,
    REPO,
    Api,
    Proc,
    running_cluster,
    service_env,
    serving,
    stop_all,
    wait_worker_ready,
)
from tests.service.test_auth import bearer, write_keys

DASHBOARD = REPO / "docker/grafana-dashboard.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(text: str) -> Samples:
    """Every sample of a scrape: (name, labels) -> value."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def scrape_until(get: Callable[[], httpx.Response], runs: int) -> Samples:
    """Scrape until `runs` runs have been observed: a run is observed just after its job's record shows it
    ended (in embedded mode, once its merge process has exited)."""
    def observed() -> Samples | None:
        samples = scrape(get().text)
        done = sum(count for (name, _), count in samples.items() if name == "adapter_merge_job_runs_total")
        return samples if done >= runs else None

    return wait_for(observed, 15, f"{runs} runs in the scrape")


@pytest.fixture(scope="module")
def embedded(models: ModelSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Api]]:
    data_dir = tmp_path_factory.mktemp("metrics-embedded")
    with serving(service_env(data_dir, models.root), data_dir / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def merged(embedded: tuple[Proc, Api], small_request: dict) -> dict:
    """One merge of a LoRA and a DoRA adapter (kind `mixed`) through the embedded server."""
    api = embedded[1]
    job = api.wait(api.submit(small_request)["id"], FINISHED, timeout=60)
    assert job["status"] == "succeeded", job["error"]
    return job


def test_embedded_scrape_has_http_store_and_job_metrics(embedded: tuple[Proc, Api], merged: dict) -> None:
    api = embedded[1]
    assert api.http.get(f"/jobs/{merged['id']}").status_code == 200
    api.http.get("/no/such/path")
    response = api.http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = scrape_until(lambda: api.http.get("/metrics"), runs=1)

    assert value(samples, "adapter_merge_jobs", status="succeeded") == 1
    assert value(samples, "adapter_merge_jobs", status="queued") == 0
    assert value(samples, "adapter_merge_queue_depth") == 0
    assert value(samples, "adapter_merge_queue_oldest_age_seconds") == 0
    assert value(samples, "adapter_merge_workers_live") == 1
    assert value(samples, "adapter_merge_store_up") == 1

    # Observed by the merge process the embedded worker forked, served by the API through the shared folder.
    assert value(samples, "adapter_merge_merge_duration_seconds_count", kind="mixed") == 1
    assert value(samples, "adapter_merge_merge_duration_seconds_sum", kind="mixed") == pytest.approx(
        merged["timings"]["merge"])
    assert value(samples, "adapter_merge_merge_bytes_per_second_count", kind="mixed") == 1
    assert value(samples, "adapter_merge_job_runs_total", status="succeeded") == 1
    assert value(samples, "adapter_merge_download_duration_seconds_count") == 0  # local inputs: no download

    # Route templates, never raw paths: a job id or an unknown path adds no series.
    assert value(samples, "adapter_merge_http_requests_total", method="GET", route="/jobs/{job_id}",
                 status="200") >= 1
    assert value(samples, "adapter_merge_http_requests_total", method="POST", route="/merge", status="202") == 1
    assert value(samples, "adapter_merge_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert value(samples, "adapter_merge_http_request_duration_seconds_count", method="POST", route="/merge") == 1
    routes = {dict(labels).get("route") for name, labels in samples if name == "adapter_merge_http_requests_total"}
    assert not any(merged["id"] in route for route in routes), routes

    # The embedded worker observed the run its merge process reported: no files of that process remain.
    folder = Path(tempfile.gettempdir()) / f"adapter-merge-serve-{embedded[0].pid}"
    merging = merged["worker"].rsplit(":", 1)[1]
    assert not [path.name for path in folder.iterdir() if path.stem.endswith(f"_{merging}")]


def test_dashboard_queries_only_metrics_a_real_scrape_has(embedded: tuple[Proc, Api], merged: dict) -> None:
    """Every metric docker/grafana-dashboard.json queries exists in the scrape of a server that merged once."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queried = {name for expr in exprs for name in re.findall(r"\badapter_merge_\w+", expr)}
    served = {name for name, _ in scrape_until(lambda: embedded[1].http.get("/metrics"), runs=1)}
    assert queried and not queried - served, f"the dashboard queries metrics nobody serves: {queried - served}"
    for topic in ("adapter_merge_jobs", "adapter_merge_queue_oldest_age_seconds", "adapter_merge_leases_lost_total",
                  "adapter_merge_merge_duration_seconds_bucket", "adapter_merge_http_request_duration_seconds_bucket"):
        assert topic in queried


def test_a_lost_lease_is_counted(models: ModelSet, tmp_path: Path, big_request: dict) -> None:
    """SIGKILL the embedded worker's merge process mid-merge: the API's reaper recovers the job once its lease
    has run out, and counts it; the rerun succeeds."""
    with serving(service_env(tmp_path / "data", models.root), tmp_path / "server.log") as (proc, api):
        job = api.submit(big_request)
        running = api.wait(job["id"], lambda j: j["status"] == "running" and j["progress"]["tensors_done"] > 0,
                           timeout=60)
        merging = int(running["worker"].rsplit(":", 1)[1])
        assert merging in proc.group_pids() and merging != proc.pid
        os.kill(merging, signal.SIGKILL)
        done = api.wait(job["id"], FINISHED, timeout=60)
        assert done["status"] == "succeeded" and done["attempts"] == 2, done
        assert int(done["worker"].rsplit(":", 1)[1]) != merging  # the rerun's own process
        samples = scrape_until(lambda: api.http.get("/metrics"), runs=1)
        assert value(samples, "adapter_merge_leases_lost_total") == 1
        assert value(samples, "adapter_merge_job_runs_total", status="succeeded") == 1
        assert value(samples, "adapter_merge_merge_duration_seconds_count", kind="mixed") == 1


def test_celery_worker_serves_its_own_metrics(models: ModelSet, tmp_path: Path, redis_namespace: dict[str, str],
                                              small_request: dict) -> None:
    """Distributed mode: the job histograms come from the worker's --metrics-port (its pool processes summed,
    each folded into the worker's own files once it has exited), the store's gauges from the API's /metrics."""
    env = service_env(tmp_path / "data", models.root, **redis_namespace)
    port = free_port()
    with running_cluster(tmp_path, env, []) as (_, api, _):
        worker = Proc(["worker", "--metrics-host", "127.0.0.1", "--metrics-port", str(port)], env,
                      tmp_path / "worker.log")
        try:
            wait_worker_ready(worker)
            folder = Path(tempfile.gettempdir()) / f"adapter-merge-worker-{worker.pid}"
            merged = []
            for request in (small_request, {"base_model": "small/base", "adapters": ["small/lora"]}):
                job = api.wait(api.submit(request)["id"], FINISHED, timeout=60)
                assert job["status"] == "succeeded", job["error"]
                merged.append(int(job["worker"].rsplit(":", 1)[1]))  # the pool process that merged
                worker_samples = scrape_until(lambda: httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10),
                                              runs=len(merged))
            assert worker.pid not in merged and len(set(merged)) == 2  # a pool process per job

            def folded() -> Samples | None:
                """Once a pool process has exited, a scrape folds its files into the worker's own."""
                samples = scrape(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
                left = {f"{kind}_{pid}.db" for kind in ("counter", "histogram") for pid in merged}
                return None if left & {path.name for path in folder.iterdir()} else samples

            for samples in (worker_samples, wait_for(folded, 15, "the pool processes' files folded")):
                assert value(samples, "adapter_merge_merge_duration_seconds_count", kind="mixed") == 1
                assert value(samples, "adapter_merge_merge_duration_seconds_count", kind="lora") == 1
                assert value(samples, "adapter_merge_job_runs_total", status="succeeded") == 2
                assert value(samples, "adapter_merge_leases_lost_total") == 0
            assert {"counter_folded.db", "histogram_folded.db"} <= {path.name for path in folder.iterdir()}
            api_samples = scrape(api.http.get("/metrics").text)
            assert value(api_samples, "adapter_merge_jobs", status="succeeded") == 2
            assert value(api_samples, "adapter_merge_workers_live") == 1
            assert not any(name.startswith("adapter_merge_merge_") for name, _ in api_samples)
        finally:
            stop_all([worker])


def test_metrics_need_an_admin_unless_public(models: ModelSet, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    write_keys(keys, {"reader": ("team-a", "read"), "root": ("ops", "admin")})
    settings = Settings(data_dir=tmp_path / "data", model_roots=[models.root], api_keys_file=keys)
    with TestClient(create_app(settings)) as client:
        problem(client.get("/metrics"), 401)
        problem(client.get("/metrics", headers=bearer("reader")), 403, "needs 'admin'")
        assert client.get("/metrics", headers=bearer("root")).status_code == 200
    with TestClient(create_app(settings.model_copy(update={"metrics_public": True}))) as client:
        response = client.get("/metrics")
        assert response.status_code == 200 and "adapter_merge_http_requests_total" in response.text
    assert "/metrics" not in json.dumps(create_app(settings).openapi()["paths"])  # not part of the JSON API


def test_a_store_out_of_reach_is_a_gauge_not_an_error(models: ModelSet, tmp_path: Path) -> None:
    """Nothing listens on port 1: the scrape still answers, saying the store is down, without its gauges."""
    settings = Settings(data_dir=tmp_path, model_roots=[models.root], redis_url="redis://127.0.0.1:1/0", auth="none")
    with TestClient(create_app(settings)) as client:
        response = client.get("/metrics")
        assert response.status_code == 200
        samples = scrape(response.text)
        assert value(samples, "adapter_merge_store_up") == 0
        assert not [name for name, _ in samples if name in ("adapter_merge_jobs", "adapter_merge_queue_depth")]


def test_worker_metrics_port_is_refused_when_taken(models: ModelSet, tmp_path: Path,
                                                   redis_namespace: dict[str, str]) -> None:
    """A worker asked for a port it cannot bind stops with the error instead of running unobserved."""
    env = service_env(tmp_path / "data", models.root, **redis_namespace)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        worker = Proc(["worker", "--metrics-host", "127.0.0.1", "--metrics-port", str(taken.getsockname()[1])],
                      env, tmp_path / "worker.log")
        assert worker.popen.wait(30) != 0
        worker.reap_group()
    assert "Address already in use" in worker.log_text()
