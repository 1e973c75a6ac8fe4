"""Embedded mode end to end: `adapter-merge serve` with its own worker process and SQLite state, over HTTP."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapter_merge.core.jobs import JobStatus
from adapter_merge.core.store.local import SQLiteJobStore
from tests.service.checks import (
    assert_no_leftovers,
    assert_result_matches,
    cancel_running,
    problem,
    running_with_progress,
)
from tests.service.conftest import ModelSet
from tests.service.harness import FINISHED, Api, Proc, service_env, serving, start_server


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedded-data")


@pytest.fixture(scope="module")
def server(models: ModelSet, data_dir: Path) -> Iterator[tuple[Proc, Api]]:
    with serving(service_env(data_dir, models.root), data_dir / "server.log") as running:
        yield running


@pytest.fixture
def api(server: tuple[Proc, Api]) -> Api:
    return server[1]


def test_merge_end_to_end(api: Api, data_dir: Path, small_request: dict, small_reference: Path,
                          tmp_path: Path) -> None:
    submitted = api.submit(small_request)
    assert submitted["status"] == "queued" and submitted["progress"]["tensors_total"] > 0
    assert submitted["request"]["adapters"] == [{"ref": "small/lora", "weight": 1.0},
                                                {"ref": "small/dora", "weight": 0.5}]
    job = api.wait(submitted["id"], ["succeeded", "failed"], timeout=60)
    assert job["status"] == "succeeded", job["error"]
    progress = job["progress"]
    assert progress["tensors_done"] == progress["tensors_total"] > 0
    assert progress["bytes_done"] == progress["bytes_total"] > 0
    timings, metrics = job["timings"], job["metrics"]
    assert all(timings[phase] >= 0 for phase in ("queued", "resolve", "merge", "write", "total"))
    assert timings["total"] >= timings["merge"] + timings["write"]
    assert metrics["peak_rss_bytes"] > 0 and metrics["bytes_per_second"] > 0
    assert job["worker"].split(":")[0] == socket.gethostname() and job["attempts"] == 1
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]

    dest = tmp_path / "download"
    digests = assert_result_matches(api, job, small_reference, dest, compare_tensors=True)
    check_ranges_and_conditionals(api, job, dest)
    check_archive(api, job, digests)
    check_manifest(api, job)
    assert_no_leftovers(data_dir, job["id"])

    listed = api.http.get("/jobs", params={"status": "succeeded", "limit": 1}).json()
    assert listed["total"] >= 1 and listed["limit"] == 1 and len(listed["items"]) == 1
    assert api.http.delete(f"/jobs/{job['id']}").status_code == 204
    assert api.http.get(f"/jobs/{job['id']}").status_code == 404
    assert not (data_dir / "artifacts" / job["id"]).exists()


def check_ranges_and_conditionals(api: Api, job: dict, dest: Path) -> None:
    artifact = max(job["artifacts"], key=lambda item: item["size"])
    data = (dest / artifact["path"]).read_bytes()
    size = len(data)
    for header, start, end in [("bytes=100-299", 100, 299), ("bytes=-64", size - 64, size - 1),
                               (f"bytes={size - 10}-", size - 10, size - 1)]:
        response = api.http.get(artifact["url"], headers={"Range": header})
        assert response.status_code == 206, response.text
        assert response.content == data[start:end + 1]
        assert response.headers["content-range"] == f"bytes {start}-{end}/{size}"
        assert int(response.headers["content-length"]) == end - start + 1
    etag = f'"{artifact["sha256"]}"'
    assert api.http.get(artifact["url"], headers={"If-None-Match": etag}).status_code == 304
    stale = api.http.get(artifact["url"], headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert stale.status_code == 200 and len(stale.content) == size  # If-Range mismatch: whole file
    head = api.http.head(artifact["url"])
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) == size


def check_archive(api: Api, job: dict, digests: dict[str, str]) -> None:
    response = api.http.get(job["archive_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    assert int(response.headers["content-length"]) == len(response.content)
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        members = {member.name: hashlib.sha256(archive.extractfile(member).read()).hexdigest()
                   for member in archive.getmembers()}
    assert members == {f"{job['id']}/{path}": sha for path, sha in digests.items()}


def check_manifest(api: Api, job: dict) -> None:
    """The manifest describes the request: the adapters with their weights, the base it went into."""
    manifest_url = next(item["url"] for item in job["artifacts"] if item["path"] == "merge_manifest.json")
    manifest = json.loads(api.http.get(manifest_url).content)
    assert [adapter["weight"] for adapter in manifest["adapters"]] == [1.0, 0.5]
    assert manifest["base"]["path"].endswith("small/base")


def test_bad_requests_over_the_wire(api: Api) -> None:
    """The refusals as a client sees them on a real socket (every other case runs in process, in
    test_api_errors): a body cut short, a body without a Content-Type, a merge the preflight refuses."""
    problem(api.http.post("/merge", content=b'{"base_model": "small/base",',
                          headers={"content-type": "application/json"}), 400, "not valid JSON")
    problem(api.http.post("/merge", content=b'{"base_model": "x"}'), 415, "Content-Type header missing")
    body = problem(api.http.post("/merge", json={"base_model": "small/base",
                                                 "adapters": ["small/lora", "other/lora"]}), 422, "adapters[1].ref")
    assert body["field"] == "adapters[1].ref" and body["type"].endswith("inputs-do-not-fit")
    assert "model.layers." in body["detail"]  # the message names the tensor at fault


def test_cancel_queued_and_running_jobs(api: Api, data_dir: Path, big_request: dict, small_request: dict) -> None:
    """A queued job is cancelled at once and never runs; a running one stops within seconds, mid-merge,
    leaving nothing behind. An active job cannot be deleted, a cancelled one can; cancelling twice is harmless."""
    running = api.submit(big_request)
    api.wait(running["id"], running_with_progress, timeout=60)
    queued = api.submit(small_request)  # one worker, busy: this one waits in the queue
    response = api.http.post(f"/jobs/{queued['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert api.http.delete(f"/jobs/{running['id']}").status_code == 409  # still active
    cancel_running(api, running["id"], data_dir)
    assert api.http.post(f"/jobs/{running['id']}/cancel").status_code == 200  # idempotent
    assert api.http.delete(f"/jobs/{running['id']}").status_code == 204
    assert api.job(queued["id"])["started_at"] is None  # never ran


def test_stopped_and_crashed_servers_lose_no_job(models: ModelSet, tmp_path: Path, big_request: dict,
                                                small_request: dict, big_reference: Path,
                                                small_reference: Path) -> None:
    """One data dir, three servers in turn. The first is stopped (SIGTERM) mid-merge with a second job
    queued: its worker puts the running job back in the queue. The second resumes that job and is SIGKILLed
    mid-merge with its worker: nothing can requeue it, it stays `running`. The third recovers it by its
    lease and runs both jobs to results identical to the engine CLI's."""
    env, data = service_env(tmp_path / "data", models.root), tmp_path / "data"
    proc, api = start_server(env, tmp_path / "first.log")
    try:
        interrupted = api.submit(big_request)
        api.wait(interrupted["id"], running_with_progress, timeout=60)
        queued = api.submit(small_request)
    finally:
        api.close()
        assert proc.stop() == 0, proc.tail()
    assert "back to the queue" in proc.log_text()
    store = SQLiteJobStore(data / "jobs.sqlite3")  # state on disk between the servers
    assert [store.get(job["id"]).status for job in (interrupted, queued)] == [JobStatus.queued] * 2
    assert_no_leftovers(data, interrupted["id"])

    proc, api = start_server(env, tmp_path / "second.log")
    try:
        api.wait(interrupted["id"], lambda job: job["attempts"] == 2 and running_with_progress(job), timeout=60)
        assert api.job(queued["id"])["status"] == "queued"  # one worker: the older job goes first
    finally:
        api.close()
        proc.kill_group()  # API, worker and merge process die at once: no chance to requeue
        proc.reap_group()
    assert store.get(interrupted["id"]).status is JobStatus.running

    proc, api = start_server(env, tmp_path / "third.log")
    try:
        first = api.wait(interrupted["id"], FINISHED, timeout=120)
        second = api.wait(queued["id"], FINISHED, timeout=60)
        assert first["status"] == second["status"] == "succeeded", (first["error"], second["error"])
        assert first["attempts"] == 3 and second["attempts"] == 1
        assert [note for note in first["notes"] if "stopped renewing its lease (attempt 2)" in note]
        assert_result_matches(api, first, big_reference)
        assert_result_matches(api, second, small_reference)
        assert_no_leftovers(data, interrupted["id"])
    finally:
        api.close()
        assert proc.stop() == 0
