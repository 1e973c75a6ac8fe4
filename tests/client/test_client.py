"""adapter_merge.client against real servers (tests/client/conftest.py): the job lifecycle, typed errors with
their problem documents, token authentication, paged listing, downloads that resume and that refuse a file
whose sha256 is wrong, and the asyncio twin."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import adapter_merge.client.calls as calls
from adapter_merge.client import (
    AsyncClient,
    ChecksumMismatch,
    Client,
    Conflict,
    Forbidden,
    Job,
    JobFailed,
    NotFound,
    Unauthorized,
    Unavailable,
    ValidationFailed,
)
from tests.client.conftest import SMALL, KeyedService

PROBLEM = "urn:adapter-merge:problem:"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_client_loads_nothing_heavy() -> None:
    """Integrators import it beside their own code: httpx and the standard library, nothing of the server."""
    code = ("import sys, adapter_merge.client; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'pydantic', 'fastapi', 'starlette', 'celery', 'redis', 'safetensors'}), "
            "sorted(m for m in sys.modules if m.startswith('adapter_merge.') and not "
            "m.startswith('adapter_merge.client')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["[]", "[]"], result.stdout


def test_submit_wait_list_download(service: str, tmp_path: Path) -> None:
    base, adapters, weights = SMALL
    seen: list[Job] = []
    with Client(service) as client:
        job = client.submit(base, adapters, weights=weights, output_dtype="float32", reuse=False)
        assert job.status in ("queued", "running") and job.data["request"]["output_dtype"] == "float32"
        done = client.wait(job, timeout=120, on_progress=seen.append)
        assert done.status == "succeeded" and done.artifacts and seen[-1].status == "succeeded"
        assert seen[0].id == job.id and all(item.progress.fraction <= 1.0 for item in seen)
        assert job.id in {item.id for item in client.list(status="succeeded")}
        paths = client.download(done, tmp_path / "out")
        assert sorted(str(path.relative_to(tmp_path / "out")) for path in paths) == \
            sorted(artifact.path for artifact in done.artifacts)
        assert {path.name: sha256(path) for path in paths} == \
            {Path(artifact.path).name: artifact.sha256 for artifact in done.artifacts}
        assert not list((tmp_path / "out").rglob("*.partial"))


def test_listing_goes_through_every_page(service: str, merged: Job, monkeypatch: pytest.MonkeyPatch) -> None:
    with Client(service) as client:
        client.submit(*SMALL[:2], weights=SMALL[2])  # a second job at least (reused from `merged`)
        everything = [job.id for job in client.list()]
        monkeypatch.setattr(calls, "PAGE_SIZE", 1)
        assert [job.id for job in client.list()] == everything
        assert [job.id for job in client.list(limit=1)] == everything[:1]
        assert merged.id in {job.id for job in client.list(status=["succeeded", "failed"], limit=500)}


def test_idempotency_key_and_reuse(service: str, merged: Job) -> None:
    """The same key answers with the same job; an identical request (reuse on) shares the kept result at once,
    and the job says so in a field the client does not model (kept in `data`)."""
    key = f"client-test-{uuid.uuid4()}"
    with Client(service) as client:
        first = client.submit(*SMALL[:2], weights=SMALL[2], idempotency_key=key)
        assert client.submit(*SMALL[:2], weights=SMALL[2], idempotency_key=key).id == first.id
    assert first.id != merged.id and first.status == "succeeded" and first.data["reused_from"]


def test_errors_are_typed_and_carry_the_problem(service: str, merged: Job) -> None:
    with Client(service) as client:
        with pytest.raises(NotFound) as missing:
            client.get("no-such-job")
        assert missing.value.status == 404 and missing.value.kind == "job-not-found"
        assert missing.value.problem["field"] == "job_id"

        with pytest.raises(ValidationFailed) as unknown:
            client.submit("no/such/model", ["small/lora"])
        assert unknown.value.kind == "reference-not-found" and unknown.value.problem["field"] == "base_model"
        assert str(unknown.value).startswith("base_model: ")

        with pytest.raises(ValidationFailed) as invalid:
            client.submit("small/base", ["small/lora"], output_dtype="float8")
        assert invalid.value.kind == "validation-error"
        assert [error["field"] for error in invalid.value.errors] == ["output_dtype"]

        with pytest.raises(Conflict) as finished:
            client.cancel(merged)
        assert finished.value.kind == "job-finished" and finished.value.problem["status_now"] == "succeeded"


def test_a_failed_job_raises_job_failed_with_its_problem(service: str) -> None:
    """A weight that overflows float16 passes every check at submission and fails while merging."""
    with Client(service) as client:
        job = client.submit("small/base", ["small/lora"], weights=[1e30], output_dtype="float16", reuse=False)
        with pytest.raises(JobFailed) as failed:
            client.wait(job, timeout=120)
    assert failed.value.job.id == job.id and failed.value.problem["type"] == PROBLEM + "numeric-error"
    assert failed.value.problem["detail"] in str(failed.value)


def test_an_unavailable_registry_says_when_to_retry(service: str) -> None:
    with Client(service) as client, pytest.raises(Unavailable) as unavailable:
        client.submit("hf://unreachable/base", ["small/lora"])
    assert unavailable.value.status == 503 and unavailable.value.kind == "registry-unavailable"
    assert unavailable.value.retry_after is not None and unavailable.value.retry_after > 0
    assert unavailable.value.problem["field"] == "base_model"


def test_token_authentication(keyed_service: KeyedService, merged: Job) -> None:
    submit_key, read_key = keyed_service.keys
    with Client(keyed_service.url) as anonymous, pytest.raises(Unauthorized) as refused:
        anonymous.get(merged.id)
    assert refused.value.status == 401 and refused.value.kind == "unauthorized"
    with Client(keyed_service.url, token=read_key) as reader, pytest.raises(Forbidden) as forbidden:
        reader.submit(*SMALL[:2])
    assert forbidden.value.problem["role"] == "read"
    with Client(keyed_service.url, token=submit_key) as client:
        job = client.wait(client.submit(*SMALL[:2], weights=SMALL[2]), timeout=120)
        assert job.status == "succeeded" and job.data["tenant"] == "team-a"
        with Client(keyed_service.url, token=read_key) as reader:
            assert [item.id for item in reader.list()] == [job.id]


def _exchanges(client: Client) -> list[tuple[str, str | None, int]]:
    """Records (path, Range header, status) of every download the client makes from now on."""
    seen: list[tuple[str, str | None, int]] = []
    client.http.event_hooks["response"].append(
        lambda response: seen.append((response.request.url.path, response.request.headers.get("range"),
                                      response.status_code)))
    return seen


def test_an_interrupted_download_resumes(service: str, merged: Job, tmp_path: Path) -> None:
    artifact = max(merged.artifacts, key=lambda item: item.size)
    with Client(service) as client:
        whole = client.http.get(artifact.url).content
        target = tmp_path / artifact.path
        target.parent.mkdir(parents=True, exist_ok=True)
        half = len(whole) // 2
        target.with_name(target.name + ".partial").write_bytes(whole[:half])  # what an interrupted call leaves
        seen = _exchanges(client)
        client.download(merged, tmp_path)
    assert target.read_bytes() == whole and sha256(target) == artifact.sha256
    assert (artifact.url, f"bytes={half}-", 206) in seen
    assert sum(1 for _, range_, _ in seen if range_ is None) == len(merged.artifacts)  # the job, and the others
    assert not list(tmp_path.rglob("*.partial"))


def test_a_corrupt_partial_file_is_refused_then_downloaded_again(service: str, merged: Job, tmp_path: Path) -> None:
    artifact = max(merged.artifacts, key=lambda item: item.size)
    target = tmp_path / artifact.path
    partial = target.with_name(target.name + ".partial")
    with Client(service) as client:
        whole = client.http.get(artifact.url).content
        target.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(bytes(byte ^ 0xFF for byte in whole[:1000]))  # the right length, the wrong bytes
        with pytest.raises(ChecksumMismatch) as mismatch:
            client.download(merged, tmp_path)
        assert mismatch.value.path == artifact.path and mismatch.value.expected == artifact.sha256
        assert not target.exists() and not partial.exists()
        seen = _exchanges(client)
        client.download(merged, tmp_path)
    assert sha256(target) == artifact.sha256
    assert (artifact.url, None, 200) in seen


def test_the_async_client(service: str, tmp_path: Path) -> None:
    async def lifecycle() -> tuple[Job, list[Path], list[str]]:
        async with AsyncClient(service) as client:
            job = await client.submit(*SMALL[:2], weights=SMALL[2], reuse=False)
            done = await client.wait(job, timeout=120)
            listed = [item.id async for item in client.list(limit=5)]
            with pytest.raises(NotFound):
                await client.get("no-such-job")
            return done, list(await client.download(done, tmp_path)), listed

    done, paths, listed = asyncio.run(lifecycle())
    assert done.status == "succeeded" and done.id in listed
    assert {path.name: sha256(path) for path in paths} == \
        {Path(artifact.path).name: artifact.sha256 for artifact in done.artifacts}
    assert json.loads((tmp_path / "config.json").read_text())
