"""Bad requests against a live server: each gets the right 4xx, as problem+json naming what is at fault."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import ModelSet
from tests.service.harness import Api, service_env, start_server


@pytest.fixture(scope="module")
def api(models: ModelSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    data = tmp_path_factory.mktemp("errors-data")
    proc, client = start_server(service_env(data, models.root), data / "server.log")
    yield client
    client.close()
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def finished_job(api: Api, small_request: dict) -> dict:
    return api.wait(api.submit(small_request)["id"], ["succeeded"], timeout=60)


def problem(response: httpx.Response, status: int, *needles: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["type"].startswith("urn:adapter-merge:problem:")
    for needle in needles:
        assert needle in body["detail"], (needle, body)
    return body


def test_malformed_json_is_400(api: Api) -> None:
    response = api.http.post("/merge", content=b'{"base_model": "small/base",',
                             headers={"content-type": "application/json"})
    problem(response, 400, "not valid JSON")


def test_non_json_body_is_415(api: Api) -> None:
    problem(api.http.post("/merge", data={"base_model": "x"}), 415, "application/x-www-form-urlencoded")
    problem(api.http.post("/merge", content=b'{"base_model": "x"}'), 415, "Content-Type header missing")


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
def test_wrong_json_shapes_are_422(api: Api, raw: bytes, needle: str) -> None:
    problem(api.http.post("/merge", content=raw, headers={"content-type": "application/json"}), 422, needle)


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
def test_invalid_fields_are_422_naming_the_field(api: Api, body: dict, field: str, needle: str) -> None:
    found = problem(api.http.post("/merge", json=body), 422, f"{field}: ", needle)
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
def test_bad_references_are_422_naming_field_and_ref(api: Api, base: str, adapter: str, field: str,
                                                     slug: str) -> None:
    body = problem(api.http.post("/merge", json={"base_model": base, "adapters": [adapter]}), 422, f"{field}: ")
    assert body["type"].endswith(slug) and body["field"] == field
    assert body["ref"] in (base, adapter)


def test_absolute_ref_outside_root_names_the_resolved_path(api: Api, models: ModelSet) -> None:
    body = problem(api.http.post("/merge", json={"base_model": str(models.outside / "base"),
                                                 "adapters": ["small/lora"]}), 422, "outside the model roots")
    assert str(models.outside / "base") in body["detail"]


def test_adapter_that_does_not_fit_the_base_is_422(api: Api) -> None:
    body = problem(api.http.post("/merge", json={"base_model": "small/base",
                                                 "adapters": ["small/lora", "other/lora"]}), 422, "adapters[1].ref")
    assert body["field"] == "adapters[1].ref" and body["type"].endswith("inputs-do-not-fit")
    assert "model.layers." in body["detail"]  # the message names the tensor at fault


def test_nothing_was_queued_by_bad_requests(api: Api) -> None:
    assert api.http.get("/jobs", params={"status": ["queued", "running"]}).json()["total"] == 0


def test_unknown_job_is_404(api: Api) -> None:
    for method, path in [("GET", "/jobs/nope"), ("POST", "/jobs/nope/cancel"), ("DELETE", "/jobs/nope"),
                         ("GET", "/jobs/nope/archive"), ("GET", "/jobs/nope/artifacts/config.json")]:
        body = problem(api.http.request(method, path), 404, "'nope'")
        assert body["field"] == "job_id"


def test_bad_query_parameters_are_422(api: Api) -> None:
    problem(api.http.get("/jobs", params={"status": "done"}), 422, "query parameter 'status'")
    problem(api.http.get("/jobs", params={"limit": 0}), 422, "query parameter 'limit'")


def test_unknown_artifact_is_404_listing_what_exists(api: Api, finished_job: dict) -> None:
    problem(api.http.get(f"/jobs/{finished_job['id']}/artifacts/../jobs.sqlite3"), 404)
    problem(api.http.get(f"/jobs/{finished_job['id']}/artifacts/nope.bin"), 404, "'nope.bin'", "config.json")


def test_bad_ranges_are_416(api: Api, finished_job: dict) -> None:
    artifact = finished_job["artifacts"][0]
    for header in [f"bytes={artifact['size']}-", "bytes=5-1", "bytes=0-1,4-5", "bytes=x-y"]:
        response = api.http.get(artifact["url"], headers={"Range": header})
        problem(response, 416, header)
        assert response.headers["content-range"] == f"bytes */{artifact['size']}"


def test_finished_job_cannot_be_cancelled(api: Api, finished_job: dict) -> None:
    problem(api.http.post(f"/jobs/{finished_job['id']}/cancel"), 409, "already succeeded")


def test_unknown_route_and_method(api: Api) -> None:
    problem(api.http.get("/nothing"), 404, "/nothing")
    problem(api.http.put("/merge", json={}), 405, "PUT")


def test_readyz(api: Api, tmp_path: Path) -> None:
    body = api.http.get("/readyz").json()
    assert body == {"status": "ready", "mode": "embedded", "checks": {"store": "ok", "broker": "ok", "data_dir": "ok"}}
