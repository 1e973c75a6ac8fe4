"""What a correct result means, checked the same way in both modes: every artifact downloads with its
advertised size, sha256 and ETag, and the merged model equals what the engine CLI wrote for the same inputs;
and what a correct refusal means: problem+json with the right status, naming what is at fault."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file

from adapter_merge.core.settings import Settings
from tests.service.harness import FINISHED, Api

MANIFEST = "merge_manifest.json"
# The manifest records when and where it was made, so it differs between runs; everything else must not.
RUN_SPECIFIC = {MANIFEST}


def reference_digests(reference: Path) -> dict[str, str]:
    """sha256 of every file the CLI wrote, from its own manifest."""
    manifest = json.loads((reference / MANIFEST).read_text())
    return {entry["path"]: entry["sha256"] for entry in manifest["outputs"]}


def assert_result_matches(api: Api, job: dict, reference: Path, dest: Path | None = None,
                          compare_tensors: bool = False) -> dict[str, str]:
    """Download every artifact and compare it with the CLI's output; returns path -> sha256."""
    digests = api.download_all(job, dest)
    expected = reference_digests(reference)
    assert set(digests) == {path.name for path in reference.iterdir()}
    for path, sha in expected.items():
        if path not in RUN_SPECIFIC:
            assert digests[path] == sha, f"{path} differs from the engine CLI's output"
    if compare_tensors:
        assert dest is not None
        for path in sorted(expected):
            if path.endswith(".safetensors"):
                ours, theirs = load_file(dest / path), load_file(reference / path)
                assert ours.keys() == theirs.keys()
                for name, tensor in ours.items():
                    assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name
    return digests


def assert_no_leftovers(data_dir: Path, job_id: str) -> None:
    """No scratch of the job and no half-written folder anywhere in the data dir."""
    work = data_dir / "work" / job_id
    assert not work.exists() or not any(work.iterdir()), list(work.rglob("*"))
    partial = [path for path in data_dir.rglob("*") if ".partial-" in path.name]
    assert not partial, partial


def running_with_progress(job: dict) -> bool:
    return job["status"] == "running" and job["progress"]["tensors_done"] > 0


def cancel_running(api: Api, job_id: str, data_dir: Path) -> dict:
    """Cancel a job that is merging: 202, then it stops within seconds, mid-merge, leaving no files."""
    asked = time.monotonic()
    response = api.http.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 202 and response.json()["cancel_requested"], response.text
    cancelled = api.wait(job_id, FINISHED, timeout=30)
    latency = time.monotonic() - asked
    print(f"\n[measure] cancel latency: {latency:.2f} s")
    assert cancelled["status"] == "cancelled", cancelled
    assert cancelled["progress"]["bytes_done"] < cancelled["progress"]["bytes_total"]  # it really was mid-merge
    assert latency < 5, f"cancel took {latency:.1f} s"
    assert cancelled["artifacts"] == [] and not (data_dir / "artifacts" / job_id).exists()
    assert_no_leftovers(data_dir, job_id)
    return cancelled


def problem(response: httpx.Response, status: int, *needles: str) -> dict:
    """An RFC 9457 problem document with `status` whose detail contains every needle; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["type"].startswith("urn:adapter-merge:problem:")
    for needle in needles:
        assert needle in body["detail"], (needle, body)
    return body


def run_queued_job(settings: Settings, job_id: str) -> None:
    """Run a queued job to its end in this process with the job runner every worker uses."""
    from adapter_merge.core.context import JobContext
    from adapter_merge.worker.runner import JobRunner

    context = JobContext.open(settings)
    try:
        assert JobRunner(context).run(job_id) is not None, f"job {job_id} was not queued"
    finally:
        context.close()
