"""What a correct result means, checked the same way in both modes: every artifact downloads with its
advertised size, sha256 and ETag, and the merged model equals what the engine CLI wrote for the same inputs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.service.harness import Api

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
