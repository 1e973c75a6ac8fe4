"""Bad requests against the app in process (embedded mode: its SQLite store, no server and no worker
process): each gets the right 4xx, as problem+json naming what is at fault. The same answers over a real
socket (malformed JSON, 415, a preflight 422) are checked against a live server in test_embedded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapter_merge.core.settings import Settings
from adapter_merge.service.app import create_app
from tests.service.checks import problem, run_queued_job
from tests.service.conftest import ModelSet


@pytest.fixture(scope="module")
def settings(models: ModelSet, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("errors-data"), model_roots=[models.root], auth="none")


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="module")
def finished_job(client: TestClient, settings: Settings, small_request: dict) -> dict:
    """A job that really ran: queued through the API, merged by the job runner in this process."""
    submitted = client.post("/merge", json=small_request)
    assert submitted.status_code == 202, submitted.text
    run_queued_job(settings, submitted.json()["id"])
    job = client.get(f"/jobs/{submitted.json()['id']}").json()
    assert job["status"] == "succeeded", job
    return job


@pytest.mark.parametrize(("raw", "needle"), [
    (b"", "body: the request body must be a JSON object"),
    (b"[1, 2]", "body: the request body must be a JSON object"),
    (b'{"base_model": "small/base", "adapters": [{"ref": "small/lora", "weight": Infinity}]}',
     "adapters[0].weight: Input should be a finite number"),
    (b'{"base_model": "small/base", "adapters": [{"ref": "small/lora", "weight": true}]}',
     "adapters[0].weight: Input should be a valid number"),
    (b'{"base_model": "small/base", "adapters": ["small/lora"], "max_shard_size": true}', "max_shard_size: "),
    (b'{"base_model": 5, "adapters": ["small/lora"]}', "base_model: Input should be a valid string"),
])
def test_wrong_json_shapes_are_422(client: TestClient, raw: bytes, needle: str) -> None:
    problem(client.post("/merge", content=raw, headers={"content-type": "application/json"}), 422, needle)


def test_form_body_is_415(client: TestClient) -> None:
    problem(client.post("/merge", data={"base_model": "x"}), 415, "application/x-www-form-urlencoded")


@pytest.mark.parametrize(("body", "field", "needle"), [
    ({"base_model": "small/base", "adapters": ["small/lora"], "lora_scale": 2}, "lora_scale", "unknown field"),
    ({"base_model": "small/base", "adapters": [{"ref": "small/lora", "wieght": 1}]}, "adapters[0].wieght",
     "unknown field"),
    ({"base_model": "small/base", "adapters": [{"ref": "small/lora", "weight": "1"}]}, "adapters[0].weight",
     "valid number"),
    ({"base_model": "small/base", "adapters": []}, "adapters", "at least 1"),
    ({"adapters": ["small/lora"]}, "base_model", "required"),
    ({"base_model": "small/base", "adapters": ["small/lora"], "output_dtype": "int8"}, "output_dtype", "bfloat16"),
    ({"base_model": "small/base", "adapters": ["small/lora"], "max_shard_size": "5XB"}, "max_shard_size", "5XB"),
    ({"base_model": "small/base", "adapters": ["small/lora"], "max_shard_size": 0}, "max_shard_size", "positive"),
])
def test_invalid_fields_are_422_naming_the_field(client: TestClient, body: dict, field: str, needle: str) -> None:
    found = problem(client.post("/merge", json=body), 422, f"{field}: ", needle)
    assert field in [error["field"] for error in found["errors"]]


@pytest.mark.parametrize(("base", "adapter", "field", "slug"), [
    ("../small/base", "small/lora", "base_model", "reference-outside-roots"),
    ("small/../../outside", "small/lora", "base_model", "reference-outside-roots"),
    ("escape", "small/lora", "base_model", "reference-outside-roots"),  # a symlink out of the root
    ("/etc", "small/lora", "base_model", "reference-outside-roots"),
    ("small/base", "small/missing", "adapters[0].ref", "reference-not-found"),
    ("small/lora", "small/lora", "base_model", "reference-wrong-kind"),
    ("small/base", "small/base", "adapters[0].ref", "reference-wrong-kind"),
    ("small/base\x00", "small/lora", "base_model", "reference-invalid"),
])
def test_bad_references_are_422_naming_field_and_ref(client: TestClient, base: str, adapter: str, field: str,
                                                     slug: str) -> None:
    body = problem(client.post("/merge", json={"base_model": base, "adapters": [adapter]}), 422, f"{field}: ")
    assert body["type"].endswith(slug) and body["field"] == field
    assert body["ref"] in (base, adapter)


def test_absolute_ref_outside_root_names_the_resolved_path(client: TestClient, models: ModelSet) -> None:
    body = problem(client.post("/merge", json={"base_model": str(models.outside / "base"),
                                               "adapters": ["small/lora"]}), 422, "outside the model roots")
    assert str(models.outside / "base") in body["detail"]


def test_nothing_was_queued_by_bad_requests(client: TestClient) -> None:
    assert client.get("/jobs", params={"status": ["queued", "running"]}).json()["total"] == 0


def test_unknown_job_is_404(client: TestClient) -> None:
    for method, path in [("GET", "/jobs/nope"), ("POST", "/jobs/nope/cancel"), ("DELETE", "/jobs/nope"),
                         ("GET", "/jobs/nope/archive"), ("GET", "/jobs/nope/artifacts/config.json")]:
        body = problem(client.request(method, path), 404, "'nope'")
        assert body["field"] == "job_id"


def test_bad_query_parameters_are_422(client: TestClient) -> None:
    problem(client.get("/jobs", params={"status": "done"}), 422, "query parameter 'status'")
    problem(client.get("/jobs", params={"limit": 0}), 422, "query parameter 'limit'")


def test_unknown_artifact_is_404_listing_what_exists(client: TestClient, finished_job: dict) -> None:
    problem(client.get(f"/jobs/{finished_job['id']}/artifacts/../jobs.sqlite3"), 404)
    problem(client.get(f"/jobs/{finished_job['id']}/artifacts/nope.bin"), 404, "'nope.bin'", "config.json")


def test_bad_ranges_are_416(client: TestClient, finished_job: dict) -> None:
    artifact = finished_job["artifacts"][0]
    for header in [f"bytes={artifact['size']}-", "bytes=5-1", "bytes=0-1,4-5", "bytes=x-y"]:
        response = client.get(artifact["url"], headers={"Range": header})
        problem(response, 416, header)
        assert response.headers["content-range"] == f"bytes */{artifact['size']}"


def test_finished_job_cannot_be_cancelled(client: TestClient, finished_job: dict) -> None:
    problem(client.post(f"/jobs/{finished_job['id']}/cancel"), 409, "already succeeded")


def test_active_job_cannot_be_deleted_nor_downloaded(client: TestClient, small_request: dict) -> None:
    queued = client.post("/merge", json={**small_request, "reuse": False}).json()  # not `finished_job`'s result
    problem(client.delete(f"/jobs/{queued['id']}"), 409)
    problem(client.get(f"/jobs/{queued['id']}/archive"), 409)
    assert client.post(f"/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"
    assert client.delete(f"/jobs/{queued['id']}").status_code == 204


def test_unknown_route_and_method(client: TestClient) -> None:
    problem(client.get("/nothing"), 404, "/nothing")
    problem(client.put("/merge", json={}), 405, "PUT")


def test_readyz(client: TestClient) -> None:
    body = client.get("/readyz").json()
    assert body == {"status": "ready", "mode": "embedded", "checks": {"store": "ok", "broker": "ok", "data_dir": "ok"}}


def test_unreachable_redis_is_503_not_500(models: ModelSet, tmp_path: Path, small_request: dict) -> None:
    """Nothing listens on port 1: the app still starts, says what is down, and refuses work with a 503."""
    settings = Settings(data_dir=tmp_path, model_roots=[models.root], redis_url="redis://127.0.0.1:1/0", auth="none")
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.headers["content-type"] == "application/problem+json"
        checks = ready.json()["checks"]
        assert checks["data_dir"] == "ok" and "Connection" in checks["store"] and checks["broker"] != "ok"
        problem(client.post("/merge", json=small_request), 503, "job store cannot be reached")
        problem(client.get("/jobs/anything"), 503)
