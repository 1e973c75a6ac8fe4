"""What the publishing tests share: the local models they merge, the requests, service deployments (embedded, and
distributed with a Celery worker that a test may SIGKILL) and the checks of a published folder against the job.

The merge is re-sharded to 7 MB shards (`max_shard_size`), so its first shard (about 7 MB) is above the 5 MiB part
size the services here use: S3 receives it as a multipart upload. A deployment made with `pace` publishes at most
that many bytes per second (MERGE_PUBLISH_BYTES_PER_SECOND, a production setting): the ~7.6 MB model then takes
about 7.6 MB / pace to publish, a window in which a test can kill the worker.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.service.harness import FINISHED, Api, Proc, running_cluster, service_env, serving, start_worker
from tools.synthetic import DEMO, write_llama_base, write_lora_adapter

MANIFEST = "merge_manifest.json"
PART_BYTES = 5 << 20
SHARD_SIZE = "7MB"


@dataclass(frozen=True)
class Models:
    root: Path


PACE = 2_000_000
"""Bytes per second of a publish meant to be killed or cancelled midway: the ~7.6 MB model takes ~3.8 s."""


def write_models(root: Path) -> Models:
    """A Llama-shaped base (demo shape, ~7.6 MB) and two LoRA adapters for it, in one model root."""
    base = write_llama_base(root / "base", **DEMO)
    write_lora_adapter(base, root / "lora", r=8)
    write_lora_adapter(base, root / "lora2", r=8, seed=3)
    return Models(root)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    """`write_models` once per publishing module, so each module's services merge from a model root of its own."""
    return write_models(tmp_path_factory.mktemp("publish-models"))


def merge_request(to: str, *, alias: str | None = None, weight: float = 1.0, adapter: str = "lora",
                  **fields: Any) -> dict[str, Any]:
    publish: dict[str, Any] = {"to": to} if alias is None else {"to": to, "alias": alias}
    return {"base_model": "base", "adapters": [{"ref": adapter, "weight": weight}], "max_shard_size": SHARD_SIZE,
            "publish": publish, **fields}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def publish_env(registry_env: dict[str, str], allowed: str, pace: int | None = None) -> dict[str, str]:
    env = {**registry_env, "MERGE_ALLOWED_SOURCES": allowed, "MERGE_PUBLISH_PART_BYTES": str(PART_BYTES),
           "MERGE_DOWNLOAD_TIMEOUT_SECONDS": "10", "MERGE_DOWNLOAD_RETRIES": "1"}
    if pace is not None:
        env["MERGE_PUBLISH_BYTES_PER_SECOND"] = str(pace)
    return env


@dataclass
class Deployment:
    api: Api
    data_dir: Path

    def result_dir(self, job: dict[str, Any]) -> Path:
        """Where the job's merged files are (the attempt that finished)."""
        return self.data_dir / "artifacts" / job["id"] / f"attempt-{job['attempts']}"


@contextmanager
def embedded(models: Models, data_dir: Path, env: dict[str, str]) -> Iterator[Deployment]:
    with serving(service_env(data_dir, models.root, **env), data_dir / "server.log") as (_, api):
        yield Deployment(api, data_dir)


@dataclass
class Cluster(Deployment):
    """A server and Celery workers on the session's Redis; `kill_worker` is a crashed node."""

    env: dict[str, str]
    workers: list[Proc]

    def kill_worker(self) -> None:
        (victim,) = self.workers
        victim.kill_group()
        self.workers.remove(victim)
        victim.reap_group()

    def start_worker(self) -> None:
        self.workers.append(start_worker(self.env, self.data_dir / f"worker-{uuid.uuid4().hex[:6]}.log"))


@contextmanager
def cluster(models: Models, data_dir: Path, env: dict[str, str], redis_namespace: dict[str, str]) -> Iterator[Cluster]:
    full = service_env(data_dir, models.root, **env, **redis_namespace)
    with running_cluster(data_dir, full, [full]) as (_, api, workers):
        yield Cluster(api, data_dir, full, workers)


def assert_kept(deployment: Deployment, job: dict[str, Any]) -> None:
    """A job that failed to publish keeps its merged files on disk, every one as its manifest lists it (the API
    lists artifacts of succeeded jobs only), and says so."""
    folder = deployment.result_dir(job)
    outputs = json.loads((folder / MANIFEST).read_text())["outputs"]
    assert outputs and all(sha256((folder / entry["path"]).read_bytes()) == entry["sha256"] for entry in outputs)
    assert any("publishing failed" in note for note in job["notes"]), job["notes"]


def finished(api: Api, job_id: str, status: str = "succeeded", timeout: float = 90) -> dict[str, Any]:
    job = api.wait(job_id, FINISHED, timeout=timeout)
    assert job["status"] == status, job["error"] or job
    return job


def artifact_digests(job: dict[str, Any]) -> dict[str, str]:
    return {artifact["path"]: artifact["sha256"] for artifact in job["artifacts"]}


def digest_of(job: dict[str, Any]) -> str:
    """The request digest the publish is identified by (the job id for a job without one)."""
    return job["request_digest"] or job["id"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_published_progress(job: dict[str, Any]) -> None:
    """The job went through publishing to the end: its last progress is the upload, every byte of the result."""
    progress, total = job["progress"], sum(artifact["size"] for artifact in job["artifacts"])
    assert (progress["phase"], progress["bytes_done"], progress["bytes_total"]) == ("publishing", total, total)
    assert job["timings"]["publish"] > 0 and job["timings"]["total"] > job["timings"]["publish"]


def assert_lineage(lineage: dict[str, Any], job: dict[str, Any]) -> None:
    """merge_lineage.json: the job, its digest, the inputs as given and as pinned, options and every file's sha256."""
    assert (lineage["job_id"], lineage["request_digest"]) == (job["id"], digest_of(job))
    assert lineage["base"]["ref"] == job["request"]["base_model"] == job["inputs"][0]["ref"]
    assert lineage["base"]["pinned"] == job["inputs"][0]["version"]
    assert [(adapter["ref"], adapter["weight"]) for adapter in lineage["adapters"]] == [
        (adapter["ref"], adapter["weight"]) for adapter in job["request"]["adapters"]]
    assert lineage["options"] == {"output_dtype": "auto", "max_shard_size": 7_000_000}
    assert lineage["manifest_sha256"] == artifact_digests(job)
    assert lineage["engine_version"]
