"""The schema is only as good as the client it generates: openapi-python-client turns openapi.json into a
package without a warning, and a merge runs through it against a real server with an API key: submit (202,
Location), poll to succeeded, list, typed problems for bad requests, an artifact (binary, sha256 checked),
the archive (a tar), readiness."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.client.conftest import KeyedService
from tests.service.harness import REPO

PACKAGE = "merge_api_client"
CONFIG = {
    "project_name_override": PACKAGE,
    "package_name_override": PACKAGE,
    # The generator reads only JSON, octet-stream and text bodies; the archive's application/x-tar is bytes too.
    "content_type_overrides": {"application/x-tar": "application/octet-stream"},
}


OPERATIONS = {"submit_merge", "get_job", "list_jobs", "cancel_job", "delete_job", "get_artifact", "head_artifact",
              "get_archive", "healthz", "readyz"}


def test_the_schema_names_operations_and_problems_as_clients_need() -> None:
    """Short unique operationIds (a generator names functions after them); every error response is the problem
    document as application/problem+json (FastAPI's own HTTPValidationError would come back with a route
    that declares no 422 of its own)."""
    document = json.loads((REPO / "openapi.json").read_text())
    operations = [operation for path in document["paths"].values() for operation in path.values()]
    ids = [operation["operationId"] for operation in operations]
    assert len(ids) == len(set(ids)) and set(ids) >= OPERATIONS, ids
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for operation in operations:
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                assert response["content"] == {"application/problem+json": {"schema": {
                    "$ref": "#/components/schemas/ProblemDetails"}}}, (operation["operationId"], status)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The generated package, importable; generation must not warn (a warning means a part left out)."""
    root = tmp_path_factory.mktemp("generated")
    config = root / "config.json"
    config.write_text(json.dumps(CONFIG))
    generator = Path(sys.executable).with_name("openapi-python-client")
    env = {**os.environ, "PATH": f"{generator.parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # its ruff hooks
    result = subprocess.run([str(generator), "generate", "--path", str(REPO / "openapi.json"), "--meta", "none",
                             "--output-path", str(root / PACKAGE), "--config", str(config)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stdout + result.stderr, result.stdout + result.stderr
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(root))
        for name in [name for name in sys.modules if name == PACKAGE or name.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def _api(name: str) -> ModuleType:
    return importlib.import_module(f"{PACKAGE}.api.{name}")


def test_a_merge_through_the_generated_client(generated: ModuleType, keyed_service: KeyedService) -> None:
    models = importlib.import_module(f"{PACKAGE}.models")
    submit_merge, get_job, list_jobs = _api("merge.submit_merge"), _api("jobs.get_job"), _api("jobs.list_jobs")
    get_artifact, get_archive, readyz = _api("artifacts.get_artifact"), _api("artifacts.get_archive"), \
        _api("health.readyz")
    token = next(key for key, (_, role) in keyed_service.keys.items() if role == "submit")
    client = generated.AuthenticatedClient(base_url=keyed_service.url, token=token, timeout=60)

    request = models.MergeRequest(base_model="small/base", adapters=[
        "small/lora", models.AdapterIn(ref="small/dora", weight=0.5)], output_dtype=models.OutputDtype.FLOAT32)
    accepted = submit_merge.sync_detailed(client=client, body=request)
    assert accepted.status_code == 202 and isinstance(accepted.parsed, models.JobOut)
    job = accepted.parsed
    assert accepted.headers["location"] == f"/jobs/{job.id}" and job.request.output_dtype is models.OutputDtype.FLOAT32

    deadline = time.monotonic() + 120
    while job.status not in (models.JobStatus.SUCCEEDED, models.JobStatus.FAILED) and time.monotonic() < deadline:
        time.sleep(0.2)
        job = get_job.sync(job.id, client=client)
        assert isinstance(job, models.JobOut) and isinstance(job.progress.phase, models.JobPhase)
    assert job.status is models.JobStatus.SUCCEEDED, job.error
    assert job.error is None and job.archive_url == f"/jobs/{job.id}/archive"

    page = list_jobs.sync(client=client, status=[models.JobStatus.SUCCEEDED], limit=500)
    assert isinstance(page, models.JobPage) and job.id in {item.id for item in page.items}

    artifact = max(job.artifacts, key=lambda item: item.size)
    download = get_artifact.sync_detailed(job.id, artifact.path, client=client)
    body = download.parsed.payload.read()
    assert download.status_code == 200 and download.headers["etag"] == f'"{artifact.sha256}"'
    assert len(body) == artifact.size and hashlib.sha256(body).hexdigest() == artifact.sha256

    archive = get_archive.sync(job.id, client=client)
    with tarfile.open(fileobj=io.BytesIO(archive.payload.read())) as tar:
        assert f"{job.id}/{artifact.path}" in tar.getnames()

    ready = readyz.sync(client=generated.Client(base_url=keyed_service.url))
    assert ready.mode is models.ServiceMode.EMBEDDED


def test_problems_are_typed(generated: ModuleType, keyed_service: KeyedService) -> None:
    models = importlib.import_module(f"{PACKAGE}.models")
    submit_merge, get_job = _api("merge.submit_merge"), _api("jobs.get_job")
    token = next(key for key, (_, role) in keyed_service.keys.items() if role == "submit")
    client = generated.AuthenticatedClient(base_url=keyed_service.url, token=token, timeout=60)

    missing = submit_merge.sync(client=client, body=models.MergeRequest(base_model="no/such/model",
                                                                          adapters=["small/lora"]))
    assert isinstance(missing, models.ProblemDetails)
    assert (missing.status, missing.field, missing.ref) == (422, "base_model", "no/such/model")
    assert missing.type_ == "urn:adapter-merge:problem:reference-not-found"

    invalid = submit_merge.sync(client=client, body=models.MergeRequest(base_model="small/base", adapters=[]))
    assert isinstance(invalid, models.ProblemDetails) and invalid.type_.endswith(":validation-error")
    assert isinstance(invalid.errors[0], models.FieldError) and invalid.errors[0].field == "adapters"

    unknown = get_job.sync("no-such-job", client=client)
    assert isinstance(unknown, models.ProblemDetails) and (unknown.status, unknown.field) == (404, "job_id")

    refused = get_job.sync("no-such-job", client=generated.AuthenticatedClient(base_url=keyed_service.url,
                                                                              token="wrong"))
    assert isinstance(refused, models.ProblemDetails) and refused.status == 401
