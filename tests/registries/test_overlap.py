"""A merge whose inputs come from S3 starts on the first shard while the later ones still download (the job
runner in this process, moto's S3 behind a throttling proxy, tests/registries/throttle.py):

    - the job shows tensors merged while its last shard is still on its way, and its result is the local
      merge's, byte for byte; the cache entry is complete and verified afterwards;
    - a shard that can no longer be had mid-merge (its pinned version deleted, the link broken, so that the
      transfer has to resume) fails the job with the download's problem, naming field and file, and leaves no
      output and nothing in the cache;
    - cancelling the job mid-merge stops the merge and the download alike.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapter_merge.core.context import JobContext
from adapter_merge.core.jobs import JobRecord, JobStatus, Progress
from adapter_merge.core.preflight import pin_request
from adapter_merge.core.request import MergeRequest
from adapter_merge.core.sources.base import PinnedInput
from adapter_merge.worker.downloads import MARKER, DownloadCache
from adapter_merge.worker.runner import JobRunner
from tests.registries.fixtures import TinyModels
from tests.registries.s3 import S3Server
from tests.registries.test_sources_common import settings_for
from tests.registries.throttle import ThrottledProxy
from tests.service.checks import reference_digests
from tests.service.conftest import cli_merge

BYTES_PER_SECOND = 1_000_000
"""The base (~7.6 MB in three shards) takes about 8 s to arrive, the tiny merge well under one."""
LAST_SHARD = "model-00003-of-00003.safetensors"


@pytest.fixture
def proxy(s3: S3Server) -> Iterator[ThrottledProxy]:
    with ThrottledProxy(s3.endpoint_url, BYTES_PER_SECOND) as proxy:
        yield proxy


@pytest.fixture
def context(s3: S3Server, proxy: ThrottledProxy, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[JobContext]:
    """A worker's context whose S3 answers at BYTES_PER_SECOND."""
    for name, value in {**s3.env, "AWS_ENDPOINT_URL": proxy.endpoint_url}.items():
        monkeypatch.setenv(name, value)
    context = JobContext.open(settings_for(tmp_path, poll_seconds=0.1))
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def request_body(s3: S3Server, s3_bucket: str, tiny_models: TinyModels) -> MergeRequest:
    s3.upload_folder(tiny_models.base, s3_bucket, "base")
    s3.upload_folder(tiny_models.adapter, s3_bucket, "lora")
    return MergeRequest(base_model=f"s3://{s3_bucket}/base", adapters=[f"s3://{s3_bucket}/lora"])


def run_watched(context: JobContext, request: MergeRequest, on_progress: Callable[[str, Progress], None] = (
        lambda job_id, progress: None)) -> tuple[JobRecord, list[Progress]]:
    """Run a job to its end in a thread, its progress as the store shows it looked at every 20 ms (and handed
    to `on_progress` with the job's id as it changes)."""
    job = JobRecord(id=str(uuid.uuid4()), request=request, inputs=pin_request(request, context.sources, None))
    context.store.create(job)
    thread = threading.Thread(target=JobRunner(context).run, args=(job.id,))
    thread.start()
    seen: list[Progress] = []
    while thread.is_alive():
        progress = context.store.get(job.id).progress
        if not seen or progress != seen[-1]:
            seen.append(progress)
            on_progress(job.id, progress)
        time.sleep(0.02)
    thread.join()
    return context.store.get(job.id), seen


def merging_before_the_last_shard(progress: Progress, last_shard_bytes: int) -> bool:
    """Tensors are merged while at least the last shard's bytes are still to arrive."""
    return (progress.phase == "downloading" and progress.tensors_done > 0
            and progress.bytes_done <= progress.bytes_total - last_shard_bytes)


def base_entry(context: JobContext, job: JobRecord) -> tuple[PinnedInput, Path]:
    pinned = job.inputs[0]
    return pinned, DownloadCache(context, "tests:inspect").entry(pinned)


def test_the_merge_starts_on_the_first_shard_while_the_rest_downloads(context: JobContext, request_body: MergeRequest,
                                                                      tiny_models: TinyModels, tmp_path: Path) -> None:
    reference = cli_merge(tiny_models.base, [(tiny_models.adapter, 1.0)], tmp_path / "reference")
    last_shard_bytes = (tiny_models.base / LAST_SHARD).stat().st_size
    job, seen = run_watched(context, request_body)
    assert job.status is JobStatus.succeeded, job.error
    assert any(merging_before_the_last_shard(progress, last_shard_bytes) for progress in seen), seen
    assert job.progress.phase == "merging" and job.progress.tensors_done == job.progress.tensors_total

    expected = {path: sha for path, sha in reference_digests(reference).items() if path != "merge_manifest.json"}
    assert {artifact.path: artifact.sha256 for artifact in job.artifacts if artifact.path in expected} == expected
    assert job.metrics.bytes_downloaded == sum(pinned.total_bytes for pinned in job.inputs)
    assert job.metrics.cache_hits == 0
    # The download lasted about as long as the slow link makes it, and the merge ran inside it.
    assert job.timings.download is not None and job.timings.merge is not None
    assert job.timings.download > 0.8 * job.metrics.bytes_downloaded / BYTES_PER_SECOND
    pinned, entry = base_entry(context, job)
    assert (entry / MARKER).is_file() and not list(entry.glob(".partial-*"))
    assert sorted(path.name for path in (entry / "files").iterdir()) == sorted(file.path for file in pinned.files)
    for file in pinned.files:
        assert (entry / "files" / file.path).read_bytes() == (tiny_models.base / file.path).read_bytes()
    # The manifest names the inputs as the request did, not by the download's folder, which moved since.
    manifest = json.loads((context.layout.result_dir(job.id, job.attempt) / "merge_manifest.json").read_text())
    assert manifest["base"]["path"] == request_body.base_model
    assert [adapter["path"] for adapter in manifest["adapters"]] == [request_body.adapters[0].ref]


def test_a_shard_lost_mid_merge_fails_the_job_and_leaves_nothing(context: JobContext, request_body: MergeRequest,
                                                                 s3: S3Server, s3_bucket: str, proxy: ThrottledProxy,
                                                                 tiny_models: TinyModels) -> None:
    last_shard_bytes = (tiny_models.base / LAST_SHARD).stat().st_size
    key = f"base/{LAST_SHARD}"
    deleted: list[Progress] = []

    def delete_the_last_shard(job_id: str, progress: Progress) -> None:
        if not deleted and merging_before_the_last_shard(progress, last_shard_bytes):
            version = s3.client().head_object(Bucket=s3_bucket, Key=key)["VersionId"]
            s3.client().delete_object(Bucket=s3_bucket, Key=key, VersionId=version)
            proxy.cut()  # the requests made already (each shard's, opened for its header) break off, and resume
            deleted.append(progress)

    job, _ = run_watched(context, request_body, delete_the_last_shard)
    assert deleted, "the merge never ran while the last shard was on its way"
    assert job.status is JobStatus.failed and job.error is not None
    assert job.error["type"].endswith(":download-failed") and job.error["status"] == 502, job.error
    assert (job.error["field"], job.error["file"]) == ("base_model", LAST_SHARD)
    assert job.error["detail"].startswith("base_model: ") and "gone since it was pinned" in job.error["detail"]
    assert not job.artifacts
    layout = JobRunner(context).layout
    assert not layout.result_dir(job.id, job.attempt).exists() and not layout.attempt_dir(job.id, job.attempt).exists()
    _, entry = base_entry(context, job)
    assert not (entry / MARKER).exists() and not (entry / "files").exists() and not list(entry.glob(".partial-*"))


def test_cancelling_mid_merge_stops_the_merge_and_the_download(context: JobContext, request_body: MergeRequest,
                                                               tiny_models: TinyModels) -> None:
    last_shard_bytes = (tiny_models.base / LAST_SHARD).stat().st_size
    cancelled: list[float] = []

    def cancel(job_id: str, progress: Progress) -> None:
        if not cancelled and merging_before_the_last_shard(progress, last_shard_bytes):
            context.store.request_cancel(job_id)
            cancelled.append(time.monotonic())

    job, _ = run_watched(context, request_body, cancel)
    stopped_after = time.monotonic() - cancelled[0]
    assert job.status is JobStatus.cancelled
    assert stopped_after < last_shard_bytes / BYTES_PER_SECOND, stopped_after  # not after the download's end
    _, entry = base_entry(context, job)
    assert not (entry / MARKER).exists() and not (entry / "files").exists() and not list(entry.glob(".partial-*"))
