"""Never merge the same thing twice (README: Reuse), against real servers in both modes: an identical request
shares the earlier result at once, attaches to a merge still running, and fifty at once run one merge; `reuse:
false` merges again; tenants never share. Plus what the request digest covers, in process."""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from adapter_merge.core.digest import request_digest
from adapter_merge.core.preflight import pin_request
from adapter_merge.core.request import MergeRequest
from adapter_merge.core.settings import Settings
from adapter_merge.core.sources.base import PinnedFile, PinnedInput
from adapter_merge.core.sources.registry import Sources
from tests.service.checks import running_with_progress
from tests.service.conftest import ModelSet
from tests.service.deployments import Deployment, deployment, digests, weighted
from tests.service.harness import FINISHED
from tests.service.test_webhooks import WEBHOOKS, Receiver, delivered_state, receiver  # noqa: F401 - receiver: a fixture

FIFTY = 50


@pytest.fixture(scope="module", params=["embedded", "distributed"])
def deployed(request: pytest.FixtureRequest, models: ModelSet,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    namespace = request.getfixturevalue("redis_namespace") if request.param == "distributed" else None
    with deployment(request.param, tmp_path_factory.mktemp(f"reuse-{request.param}"), models.root,
                    namespace, **WEBHOOKS) as running:
        yield running


def merged(deployed: Deployment, body: dict) -> dict:
    job = deployed.api.wait(deployed.api.submit(body)["id"], FINISHED, timeout=120)
    assert job["status"] == "succeeded", job["error"]
    return job


def test_an_identical_request_shares_the_result_at_once(deployed: Deployment, tmp_path: Path) -> None:
    first = merged(deployed, weighted(0.1))
    assert len(first["request_digest"]) == 64 and first["reused_from"] is None
    asked = time.perf_counter()
    second = deployed.api.submit(weighted(0.1))
    seconds = time.perf_counter() - asked
    print(f"\n[measure] {deployed.mode}: POST /merge answered from an earlier result in {seconds * 1000:.0f} ms "
          f"(the merge took {first['timings']['total']:.2f} s)")
    assert seconds < 1.0
    assert second["status"] == "succeeded" and second["id"] != first["id"]
    assert second["reused_from"] == first["id"] and second["request_digest"] == first["request_digest"]
    assert second["metrics"]["cache_hit"] is True and first["metrics"]["cache_hit"] is None
    assert second["timings"]["total"] < 0.5 and second["timings"]["merge"] is None
    assert second["created_at"] and second["started_at"] and second["finished_at"]
    assert digests(second) == digests(first)
    assert deployed.api.job(second["id"]) == second  # GET shows the same, digest included
    assert deployed.api.http.delete(f"/jobs/{first['id']}").status_code == 204
    assert deployed.api.download_all(second, tmp_path) == digests(first)  # bytes checked against each sha256
    third = deployed.api.submit(weighted(0.1))  # the second job's result is shared in turn
    assert third["reused_from"] == second["id"] and digests(third) == digests(first)


def test_a_shared_result_calls_back_too(deployed: Deployment, receiver: Receiver) -> None:  # noqa: F811
    """A job created succeeded (sharing a result) has its callback due at once, like a job whose run ended."""
    first = merged(deployed, weighted(0.6))
    path = receiver.path(200)
    shared = deployed.api.submit({**weighted(0.6), "callback_url": receiver.url + path})
    assert shared["status"] == "succeeded" and shared["reused_from"] == first["id"], shared
    assert shared["webhook"]["state"] == "pending"
    (call,) = receiver.wait(path, 1)
    assert call.event["type"] == "job.succeeded" and call.event["data"]["id"] == shared["id"]
    assert call.event["data"]["reused_from"] == first["id"] and call.event["data"]["artifacts"]
    done = deployed.api.wait(shared["id"], delivered_state, timeout=30)
    assert done["webhook"]["state"] == "delivered" and done["webhook"]["attempts"] == 1


def test_reuse_false_merges_again(deployed: Deployment) -> None:
    first = merged(deployed, weighted(0.2))
    fresh = deployed.api.submit({**weighted(0.2), "reuse": False})
    assert fresh["status"] == "queued" and fresh["reused_from"] is None
    again = deployed.api.wait(fresh["id"], FINISHED, timeout=120)
    assert again["status"] == "succeeded" and again["attempts"] == 1 and again["metrics"]["cache_hit"] is None
    assert again["request_digest"] == first["request_digest"]
    same = {path: sha for path, sha in digests(again).items() if path != "merge_manifest.json"}
    assert same == {path: sha for path, sha in digests(first).items() if path != "merge_manifest.json"}


def test_tenants_never_share(deployed: Deployment) -> None:
    mine = merged(deployed, weighted(0.4))
    response = deployed.post(weighted(0.4), api=deployed.other_tenant)
    assert response.status_code == 202, response.text
    theirs = response.json()
    assert theirs["tenant"] == "team-b" and theirs["reused_from"] is None and theirs["status"] == "queued"
    assert theirs["request_digest"] == mine["request_digest"]  # same digest, but another tenant's
    finished = deployed.other_tenant.wait(theirs["id"], FINISHED, timeout=120)
    assert finished["status"] == "succeeded" and finished["metrics"]["cache_hit"] is None


def test_an_identical_request_attaches_to_a_running_merge(deployed: Deployment, big_request: dict) -> None:
    api = deployed.api
    first = api.submit(big_request)
    assert api.submit(big_request)["id"] == first["id"]  # while queued (or already running)
    api.wait(first["id"], running_with_progress, timeout=60)
    attached = deployed.post(big_request)
    assert attached.status_code == 202 and attached.headers["location"] == f"/jobs/{first['id']}"
    assert attached.json()["id"] == first["id"] and attached.json()["status"] == "running"
    done = api.wait(first["id"], FINISHED, timeout=120)
    assert done["status"] == "succeeded", done["error"]
    later = api.submit(big_request)
    assert later["status"] == "succeeded" and later["reused_from"] == first["id"]
    listed = api.http.get("/jobs", params={"limit": 500}).json()["items"]
    assert sum(job["request_digest"] == first["request_digest"] for job in listed) == 2  # the merge and `later`
    for job in (first, later):  # 0.6 GB each (shared by links)
        assert api.http.delete(f"/jobs/{job['id']}").status_code == 204


def test_fifty_identical_requests_at_once_run_one_merge(deployed: Deployment) -> None:
    body = weighted(0.3)
    start = threading.Barrier(FIFTY)

    def post(_: int) -> tuple[int, dict]:
        start.wait()
        response = deployed.post(body)
        return response.status_code, response.json()

    asked = time.perf_counter()
    with ThreadPoolExecutor(FIFTY) as pool:
        answers = list(pool.map(post, range(FIFTY)))
    answered = time.perf_counter() - asked
    assert [status for status, _ in answers] == [202] * FIFTY, answers
    ids = {job["id"] for _, job in answers}
    jobs = [deployed.api.wait(job_id, FINISHED, timeout=120) for job_id in ids]
    merges = [job for job in jobs if job["reused_from"] is None]
    assert len(merges) == 1, merges
    merge = merges[0]
    assert merge["status"] == "succeeded" and merge["attempts"] == 1
    assert all(job["status"] == "succeeded" and digests(job) == digests(merge) for job in jobs)
    assert all(job["reused_from"] == merge["id"] for job in jobs if job is not merge)
    logged = deployed.log_text()
    assert logged.count(f"job {merge['id']}: attempt 1 starts") == 1
    assert not [job_id for job_id in ids - {merge["id"]} if f"job {job_id}: attempt" in logged]
    attached = sum(job["id"] == merge["id"] for _, job in answers)
    print(f"\n[measure] {deployed.mode}: {FIFTY} identical requests at once answered in {answered:.2f} s: one merge "
          f"({attached} answers attached to it, {len(ids) - 1} jobs sharing its result)")


def _digest(settings: Settings, body: dict) -> str:
    request = MergeRequest.model_validate(body)
    return request_digest(request, pin_request(request, Sources(settings), None))


def test_what_the_digest_covers(models: ModelSet) -> None:
    """Inputs (a local folder by its files' size and mtime), weights, order and output options; not where the
    result goes, who is told, or `reuse`."""
    folder = models.root / f"digest-{uuid.uuid4().hex[:8]}"
    shutil.copytree(models.root / "small", folder, symlinks=True)
    try:
        settings = Settings(model_roots=[models.root])
        name = folder.name
        body = {"base_model": f"{name}/base", "adapters": [f"{name}/lora", {"ref": f"{name}/dora", "weight": 0.5}]}
        digest = _digest(settings, body)
        assert _digest(settings, body) == digest
        assert _digest(settings, {**body, "adapters": [{"ref": f"{name}/lora"}, {"ref": f"{name}/dora",
                                                                                    "weight": 0.5}]}) == digest
        assert _digest(settings, {**body, "publish": {"to": "s3://bucket/merged"}, "reuse": False,
                                  "callback_url": "https://hooks.example/x"}) == digest
        changed = [
            {**body, "adapters": [f"{name}/lora", {"ref": f"{name}/dora", "weight": 0.25}]},
            {**body, "adapters": [{"ref": f"{name}/dora", "weight": 0.5}, f"{name}/lora"]},
            {**body, "output_dtype": "float32"},
            {**body, "max_shard_size": "1MB"},
            {**body, "base_model": str(models.root / "small/base")},  # another folder with the same files
        ]
        assert len({digest, *(_digest(settings, variant) for variant in changed)}) == 1 + len(changed)
        config = folder / "lora" / "adapter_config.json"
        os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 1))
        touched = _digest(settings, body)
        (folder / "base" / "sub").mkdir()
        (folder / "base" / "sub" / "notes.txt").write_text("x")
        assert len({digest, touched, _digest(settings, body)}) == 3
    finally:
        shutil.rmtree(folder)


def test_a_remote_input_is_named_by_its_pinned_version_and_files() -> None:
    def pinned(**changes: object) -> PinnedInput:
        file = {"path": "model.safetensors", "size": 10, "sha256": "1" * 64, "etag": "e1", "version_id": None,
                "location": "prefix/model.safetensors", **changes}
        return PinnedInput(ref="hf://org/model", scheme="hf", version={"commit": "c" * 40},
                           files=[PinnedFile(**file)])

    request = MergeRequest.model_validate({"base_model": "hf://org/model", "adapters": ["hf://org/model"]})
    digest = request_digest(request, [pinned(), pinned()])
    assert request_digest(request, [pinned(location="elsewhere"), pinned()]) == digest
    for change in ({"sha256": "2" * 64}, {"etag": "e2"}, {"version_id": "v2"}, {"size": 11}, {"path": "other"}):
        assert request_digest(request, [pinned(**change), pinned()]) != digest, change
