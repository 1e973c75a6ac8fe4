"""The registry sources end to end: a fake hub, moto's S3 and a real MLflow server (tests/registries/fixtures.py)
serve the inputs, real `adapter-merge serve` processes (embedded, and distributed with a Celery worker on the
session's Redis) merge them, and every result is compared with the engine CLI's merge of the same files from local
folders.

    - a hub base, an S3 adapter and an MLflow adapter by alias merge as the local folders do, in both modes; the
      job shows the references as given and as pinned, the download's timing, bytes and cache hits, and went
      through the `downloading` phase;
    - a branch, an alias and an S3 object that move after submission change nothing: the pinned versions merge;
    - fifty merges of one base fetch each of its files once (49 cache hits);
    - a worker killed mid-download leaves only an untrusted `.partial-*`: the job is recovered by its lease and
      its rerun downloads a complete, verified entry;
    - a stalled transfer fails the job within timeout x (retries + 1) plus backoff, naming field and file;
    - a corrupted file fails its checksum (`download-corrupt`), leaves nothing complete, and succeeds once healed;
    - a registry down, a forbidden source and missing references are refused at submission;
    - figures (printed; run with -s): S3 download against `cp`, the fifty-merge cache hits, a registry merge's
      `timings.total` against the same merge from local folders.

The distributed worker keeps its pool process (`MERGE_WORKER_MAX_TASKS_PER_CHILD=0`, concurrency 2), so a job does
not pay for starting Python and importing torch: the fifty merges take seconds, not minutes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from adapter_merge.core.context import JobContext
from adapter_merge.core.settings import Settings
from adapter_merge.core.sources.base import PinnedInput
from adapter_merge.core.sources.s3 import S3Source
from adapter_merge.core.sources.transfer import backoff_seconds
from adapter_merge.worker.downloads import MARKER, DownloadCache
from tests.registries.hub import FakeHub
from tests.registries.mlflow_server import MlflowServer, PublishedVersion
from tests.registries.s3 import S3Object, S3Server
from tests.registries.test_sources_common import closed_endpoint
from tests.service.checks import assert_result_matches, problem, reference_digests
from tests.service.conftest import cli_merge
from tests.service.harness import (
    FINISHED,
    Api,
    Proc,
    running_cluster,
    service_env,
    serving,
    start_worker,
)
from tools.synthetic import DEMO, write_llama_base, write_lora_adapter

ALLOWED = "hf://e2e/*,s3://e2e-*,models:/e2e-*"
"""What the servers may fetch from: the hub's e2e org, buckets and registered models named e2e-..."""
TIMEOUT_SECONDS = 1
RETRIES = 1
SHARD = "model-00001-of-00003.safetensors"
"""The base's first shard (the third file downloaded, after config.json and generation_config.json)."""
INDEX = "model.safetensors.index.json"
FAN_OUT = 50
PREFLIGHT_WORKERS = 4


# -- inputs ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalModels:
    """The model root of every server here: a base and two adapters, plus other versions of the base and of an
    adapter (what a branch or an alias moves to)."""

    root: Path
    base: Path
    lora: Path
    dora: Path
    base_v2: Path
    lora_v2: Path


LOCAL_REQUEST = {"base_model": "base", "adapters": ["dora", {"ref": "lora", "weight": 0.5}]}
"""The merge every registry request here makes, from the local folders."""


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> LocalModels:
    root = tmp_path_factory.mktemp("e2e-models")
    base = write_llama_base(root / "base", **DEMO)
    return LocalModels(root, base, write_lora_adapter(base, root / "lora", r=8),
                       write_lora_adapter(base, root / "dora", r=8, dora=True, seed=2),
                       write_llama_base(root / "base_v2", **DEMO, seed=7),
                       write_lora_adapter(base, root / "lora_v2", r=8, seed=9))


@pytest.fixture(scope="module")
def reference(local: LocalModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The engine CLI's merge of base + dora + 0.5 x lora from the local folders."""
    return cli_merge(local.base, [(local.dora, 1.0), (local.lora, 0.5)], tmp_path_factory.mktemp("e2e-ref") / "out")


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    name = f"e2e-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name, versioned=True)
    return name


@dataclass(frozen=True)
class Published:
    """LOCAL_REQUEST's inputs in the registries: the base on the hub, dora in S3, lora in MLflow by alias."""

    repo: str
    commit: str
    objects: list[S3Object]
    version: PublishedVersion
    body: dict[str, Any]

    @property
    def refs(self) -> list[str]:
        return [self.body["base_model"], self.body["adapters"][0], self.body["adapters"][1]["ref"]]


def publish(name: str, local: LocalModels, hub: FakeHub, s3: S3Server, bucket: str, mlflow: MlflowServer) -> Published:
    repo = f"e2e/{name}"
    commit = hub.add_repo(repo, local.base)
    objects = s3.upload_folder(local.dora, bucket, f"{name}/dora")
    model = f"e2e-{name}-{uuid.uuid4().hex[:6]}"
    version = mlflow.publish(local.lora, model, alias="champion")
    body = {"base_model": f"hf://{repo}",
            "adapters": [f"s3://{bucket}/{name}/dora", {"ref": f"models:/{model}@champion", "weight": 0.5}]}
    return Published(repo, commit, objects, version, body)


@pytest.fixture(scope="module")
def published(local: LocalModels, hub_server: FakeHub, s3_server: S3Server, bucket: str,
              mlflow_server: MlflowServer) -> Published:
    return publish("both", local, hub_server, s3_server, bucket, mlflow_server)


def hub_base(name: str, local: LocalModels, hub: FakeHub) -> dict[str, Any]:
    """LOCAL_REQUEST with its base from a hub repo of its own (a new cache entry) and local adapters."""
    hub.add_repo(f"e2e/{name}", local.base)
    return {**LOCAL_REQUEST, "base_model": f"hf://e2e/{name}"}


# -- deployments ----------------------------------------------------------------------------------------------------


def registry_env(hub: FakeHub, s3: S3Server, mlflow: MlflowServer) -> dict[str, str]:
    return {**hub.env, **s3.env, **mlflow.env, "MERGE_ALLOWED_SOURCES": ALLOWED,
            "MERGE_DOWNLOAD_TIMEOUT_SECONDS": str(TIMEOUT_SECONDS), "MERGE_DOWNLOAD_RETRIES": str(RETRIES)}


@dataclass
class Deployment:
    api: Api
    data_dir: Path


@pytest.fixture(scope="module")
def embedded(local: LocalModels, hub_server: FakeHub, s3_server: S3Server, mlflow_server: MlflowServer,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    data_dir = tmp_path_factory.mktemp("e2e-embedded")
    env = service_env(data_dir, local.root, **registry_env(hub_server, s3_server, mlflow_server))
    with serving(env, data_dir / "server.log") as (_, api):
        yield Deployment(api, data_dir)


@dataclass
class Cluster(Deployment):
    env: dict[str, str]
    workers: list[Proc]
    cache: DownloadCache
    """The workers' download cache, for looking at its entries."""

    def start_worker(self) -> Proc:
        worker = start_worker(self.env, self.data_dir / f"worker-{uuid.uuid4().hex[:6]}.log")
        self.workers.append(worker)
        return worker

    @contextmanager
    def workers_paused(self) -> Iterator[None]:
        """Every worker stopped (SIGSTOP) meanwhile: what is submitted waits in the queue."""
        groups = [worker.pid for worker in self.workers]
        for group in groups:
            os.killpg(group, signal.SIGSTOP)
        try:
            yield
        finally:
            for group in groups:
                os.killpg(group, signal.SIGCONT)

    def entry(self, job: dict[str, Any], index: int = 0) -> tuple[PinnedInput, Path]:
        """The job's input `index` as pinned, and its folder in the download cache."""
        pinned = PinnedInput.model_validate(job["inputs"][index])
        return pinned, self.cache.entry(pinned)


@pytest.fixture(scope="module")
def distributed(local: LocalModels, hub_server: FakeHub, s3_server: S3Server, mlflow_server: MlflowServer,
                redis_namespace: dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    data_dir = tmp_path_factory.mktemp("e2e-distributed")
    env = service_env(data_dir, local.root, **registry_env(hub_server, s3_server, mlflow_server), **redis_namespace,
                      MERGE_WORKER_MAX_TASKS_PER_CHILD="0", MERGE_WORKER_CONCURRENCY="2",
                      MERGE_PREFLIGHT_WORKERS=str(PREFLIGHT_WORKERS))
    settings = Settings(**{key.removeprefix("MERGE_").lower(): value for key, value in env.items()
                           if key.startswith("MERGE_")})
    context = JobContext.open(settings)
    try:
        with running_cluster(data_dir, env, [env]) as (_, api, workers):
            yield Cluster(api, data_dir, env, workers, DownloadCache(context, "tests:inspect"))
    finally:
        context.close()


@pytest.fixture(params=["embedded", "distributed"])
def deployment(request: pytest.FixtureRequest) -> Deployment:
    return request.getfixturevalue(request.param)


# -- checks ---------------------------------------------------------------------------------------------------------


def finished(api: Api, job_id: str, status: str = "succeeded", timeout: float = 60) -> dict[str, Any]:
    job = api.wait(job_id, FINISHED, timeout=timeout)
    assert job["status"] == status, job["error"] or job
    return job


def assert_same_result(job: dict[str, Any], reference: Path) -> None:
    """The job's artifacts, as its record lists them, have the sha256 of the CLI's files (the manifest, which says
    when it was written, aside); `assert_result_matches` downloads them as well."""
    expected = {path: sha for path, sha in reference_digests(reference).items() if path != "merge_manifest.json"}
    assert {artifact["path"]: artifact["sha256"] for artifact in job["artifacts"] if artifact["path"] in expected} \
        == expected


def sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def assert_entry_verified(hub: FakeHub, pinned: PinnedInput, entry: Path) -> None:
    """A complete cache entry whose every file is the hub's file at the pinned commit, and nothing half-written."""
    assert (entry / MARKER).is_file() and not list(entry.glob(".partial-*")), sorted(entry.iterdir())
    for file in pinned.files:
        committed = hub.file(pinned.version["repo"], file.location or file.path, pinned.version["commit"])
        path = entry / "files" / file.path
        assert (path.stat().st_size, sha256_of(path)) == (committed.size, committed.sha256), file.path


def assert_nothing_trusted(entry: Path) -> None:
    """No marker and no files folder: nothing a later job could take for the input."""
    assert not (entry / MARKER).exists() and not (entry / "files").exists(), sorted(entry.rglob("*"))


# -- tests ----------------------------------------------------------------------------------------------------------


def test_a_hub_base_an_s3_and_an_mlflow_adapter_merge_as_the_local_folders_do(
        deployment: Deployment, hub: FakeHub, published: Published, reference: Path, tmp_path: Path) -> None:
    # The base's last file (the shard index) arrives over half a second, so the downloading phase is seen.
    hub.trickle(published.repo, INDEX, bytes_per_second=hub.file(published.repo, INDEX).size * 2)
    seen: list[tuple[str, int]] = []

    def note(job: dict[str, Any]) -> None:
        seen.append((job["progress"]["phase"], job["progress"]["bytes_done"]))

    job = deployment.api.wait(deployment.api.submit(published.body)["id"], FINISHED, timeout=60, on_poll=note)
    assert job["status"] == "succeeded", job["error"]
    assert_result_matches(deployment.api, job, reference, tmp_path)

    assert job["request"]["base_model"] == published.refs[0]
    assert job["request"]["adapters"] == [{"ref": published.refs[1], "weight": 1.0},
                                          {"ref": published.refs[2], "weight": 0.5}]
    base, lora_s3, lora_mlflow = (PinnedInput.model_validate(pinned) for pinned in job["inputs"])
    assert [base.ref, lora_s3.ref, lora_mlflow.ref] == published.refs
    assert base.version == {"repo": published.repo, "commit": published.commit}
    assert all(file.sha256 == hub.file(published.repo, file.path).sha256 for file in base.files if file.sha256)
    assert {file.location: (file.etag, file.version_id) for file in lora_s3.files} == {
        obj.key: (obj.etag, obj.version_id) for obj in published.objects}
    assert (lora_mlflow.version["version"], lora_mlflow.version["run_id"]) == (published.version.version,
                                                                                published.version.run_id)

    assert job["timings"]["download"] > 0 and job["timings"]["total"] > job["timings"]["download"]
    assert job["metrics"]["bytes_downloaded"] == sum(pinned.total_bytes for pinned in (base, lora_s3, lora_mlflow))
    assert job["metrics"]["cache_hits"] == 0
    assert any(phase == "downloading" and done > 0 for phase, done in seen), seen
    assert job["progress"]["phase"] == "merging"


def test_what_moves_after_submission_changes_nothing(distributed: Cluster, hub: FakeHub, local: LocalModels,
                                                     s3: S3Server, bucket: str, mlflow_server: MlflowServer,
                                                     reference: Path) -> None:
    """The job waits in the queue while the hub's main branch gets another base, the S3 prefix another adapter and
    the MLflow alias another version; the worker then merges what was pinned at submission."""
    pinned = publish("pinned", local, hub, s3, bucket, mlflow_server)
    with distributed.workers_paused():
        job_id = distributed.api.submit(pinned.body)["id"]
        moved = hub.commit(pinned.repo, local.base_v2)
        s3.upload_folder(local.lora_v2, bucket, "pinned/dora")
        mlflow_server.publish(local.lora_v2, pinned.version.name, alias="champion")
    job = finished(distributed.api, job_id)
    assert_same_result(job, reference)
    assert moved != pinned.commit and job["inputs"][0]["version"]["commit"] == pinned.commit
    assert job["inputs"][2]["version"]["version"] == "1"
    assert mlflow_server.client().get_model_version_by_alias(pinned.version.name, "champion").version == "2"
    assert {record.fields.get("commit") for record in hub.requests if record.kind == "resolve"} == {pinned.commit}
    assert {record.query.get("versionId", [""])[0] for record in s3.requests
            if record.kind == "GetObject" and record.key and record.key.startswith(f"{bucket}/pinned/")} == {
        obj.version_id for obj in pinned.objects}


def test_fifty_merges_of_one_base_download_it_once(distributed: Cluster, hub: FakeHub, local: LocalModels) -> None:
    """Submitted four at a time (the server checks four requests at once), so the first jobs wait for the first
    download together; the worker runs two at a time."""
    body = hub_base("fifty", local, hub)
    bodies = [{**body, "adapters": [{"ref": "lora" if index % 2 else "dora", "weight": 0.5 + index / FAN_OUT}]}
              for index in range(FAN_OUT)]
    started = time.monotonic()
    with ThreadPoolExecutor(PREFLIGHT_WORKERS) as submitting:
        ids = [job["id"] for job in submitting.map(distributed.api.submit, bodies)]
    submitted = time.monotonic() - started
    jobs = [finished(distributed.api, job_id, timeout=120) for job_id in ids]
    elapsed = time.monotonic() - started

    base_files = [file.path for file in PinnedInput.model_validate(jobs[0]["inputs"][0]).files]
    assert {path: hub.downloads("e2e/fifty", path) for path in base_files} == dict.fromkeys(base_files, 1)
    hits = sum(job["metrics"]["cache_hits"] for job in jobs)
    assert hits == FAN_OUT - 1
    assert sorted(job["metrics"]["bytes_downloaded"] for job in jobs) == [0] * (FAN_OUT - 1) + [
        PinnedInput.model_validate(jobs[0]["inputs"][0]).total_bytes]
    print(f"\n[figure] {FAN_OUT} merges of one hub base (distributed, 1 worker, concurrency 2, pool kept): "
          f"submitted in {submitted:.1f} s, all done in {elapsed:.1f} s; base files downloaded once each, "
          f"cache hits {hits}")


def test_a_worker_killed_mid_download_leaves_no_entry_a_rerun_trusts(distributed: Cluster, hub: FakeHub,
                                                                     local: LocalModels, reference: Path) -> None:
    """The shard trickles at 640 KiB/s: its first MiB (what the hub client hands on at once) arrives after 1.6 s,
    the whole of it after 4.2 s; the worker is killed in between."""
    body = hub_base("killed", local, hub)
    hub.trickle("e2e/killed", SHARD, bytes_per_second=640 * 1024)
    submitted = distributed.api.submit(body)
    job_id, (pinned, entry) = submitted["id"], distributed.entry(submitted)
    paths = [file.path for file in pinned.files]
    before_shard = sum(file.size for file in pinned.files[:paths.index(SHARD)])
    distributed.api.wait(job_id, lambda job: job["progress"]["phase"] == "downloading" and before_shard
                         < job["progress"]["bytes_done"] < before_shard + pinned.files[paths.index(SHARD)].size,
                         timeout=30)
    (victim,) = distributed.workers
    victim.kill_group()
    distributed.workers.remove(victim)
    victim.reap_group()
    hub.heal()
    assert list(entry.glob(".partial-*")) and not distributed.cache.has(pinned)
    assert_nothing_trusted(entry)

    distributed.start_worker()
    job = finished(distributed.api, job_id)
    assert job["attempts"] == 2 and any("stopped renewing its lease" in note for note in job["notes"])
    assert (job["metrics"]["bytes_downloaded"], job["metrics"]["cache_hits"]) == (pinned.total_bytes, 0)
    assert_same_result(job, reference)
    assert_entry_verified(hub, pinned, entry)


def test_a_stalled_transfer_fails_the_job_within_the_timeouts(distributed: Cluster, hub: FakeHub,
                                                              local: LocalModels) -> None:
    """Once submitted (preflight reads the shard's header), the shard's bytes never come: the worker's GET gives up
    after the timeout and is made once more, so the job fails within (retries + 1) x timeout plus the backoff and
    the job's own start and end."""
    body = hub_base("stalled", local, hub)
    attempts = RETRIES + 1
    bound = attempts * TIMEOUT_SECONDS + sum(backoff_seconds(retry) for retry in range(RETRIES)) + 4.0
    with distributed.workers_paused():
        job_id = distributed.api.submit(body)["id"]
        hub.stall("e2e/stalled", SHARD)
        resumed = time.monotonic()
    job = finished(distributed.api, job_id, "failed", timeout=30)
    elapsed = time.monotonic() - resumed
    print(f"\n[measure] stalled shard: failed {elapsed:.1f} s after the worker resumed (bound {bound:.1f} s)")
    assert attempts * TIMEOUT_SECONDS <= elapsed <= bound
    error = job["error"]
    assert error["type"].rsplit(":", 1)[1] in ("download-failed", "registry-unavailable"), error
    assert (error["field"], error["file"]) == ("base_model", SHARD) and SHARD in error["detail"]
    assert error["detail"].startswith("base_model: ")
    assert_nothing_trusted(distributed.entry(job)[1])


def test_a_corrupted_file_fails_its_checksum_and_a_healed_one_merges(distributed: Cluster, hub: FakeHub,
                                                                     local: LocalModels, reference: Path) -> None:
    body = hub_base("corrupt", local, hub)
    hub.corrupt("e2e/corrupt", SHARD)  # the middle byte: the header preflight reads is intact
    failed = finished(distributed.api, distributed.api.submit(body)["id"], "failed")
    error = failed["error"]
    assert error["type"].endswith(":download-corrupt") and error["status"] == 502
    assert (error["field"], error["file"]) == ("base_model", SHARD) and "sha256" in error["detail"]
    pinned, entry = distributed.entry(failed)
    assert_nothing_trusted(entry)
    assert not list(entry.glob(".partial-*")) and not distributed.cache.has(pinned)

    hub.heal()
    job = finished(distributed.api, distributed.api.submit(body)["id"])
    assert job["inputs"][0] == failed["inputs"][0]
    assert_same_result(job, reference)
    assert_entry_verified(hub, pinned, entry)
    assert hub.downloads("e2e/corrupt", SHARD) == 2


def test_bad_references_are_refused_at_submission(embedded: Deployment, published: Published, bucket: str,
                                                  local: LocalModels, hub_server: FakeHub, s3_server: S3Server,
                                                  mlflow_server: MlflowServer,
                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    api, base = embedded.api, published.refs[0]
    refused = [
        ({"base_model": "hf://elsewhere/base", "adapters": ["lora"]}, 422, "reference-forbidden", "base_model"),
        ({"base_model": "hf://e2e/no-such-repo", "adapters": ["lora"]}, 422, "reference-not-found", "base_model"),
        ({"base_model": base, "adapters": [f"s3://{bucket}/no/such/prefix"]}, 422, "reference-not-found",
         "adapters[0].ref"),
        ({"base_model": base, "adapters": ["lora", f"models:/{published.version.name}/99"]}, 422,
         "reference-not-found", "adapters[1].ref"),
    ]
    for body, status, kind, field in refused:
        answer = problem(api.http.post("/merge", json=body), status, f"{field}: ")
        assert (answer["type"].rsplit(":", 1)[1], answer["field"]) == (kind, field), answer

    data_dir = tmp_path_factory.mktemp("e2e-down")
    down = {**registry_env(hub_server, s3_server, mlflow_server), "HF_ENDPOINT": closed_endpoint(),
            "AWS_ENDPOINT_URL": closed_endpoint(), "MLFLOW_TRACKING_URI": closed_endpoint(),
            "MLFLOW_REGISTRY_URI": closed_endpoint()}
    with serving(service_env(data_dir, local.root, **down), data_dir / "server.log") as (_, api):
        for body, field in (({"base_model": base, "adapters": ["lora"]}, "base_model"),
                            ({"base_model": "base", "adapters": [published.refs[1]]}, "adapters[0].ref"),
                            ({"base_model": "base", "adapters": [published.refs[2]]}, "adapters[0].ref")):
            response = api.http.post("/merge", json=body)
            answer = problem(response, 503, f"{field}: ", "cannot be reached")
            assert answer["type"].endswith(":registry-unavailable") and answer["field"] == field
            assert int(response.headers["retry-after"]) > 0


# -- figures --------------------------------------------------------------------------------------------------------


def test_figure_s3_download_against_cp(s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """256 MiB of random bytes through `S3Source.download` from the local moto server, against `cp` of the same
    file on this disk (medians of 3)."""
    size_mib = 256
    folder = tmp_path / "big"
    folder.mkdir()
    with (folder / "blob.bin").open("wb") as out:
        for _ in range(size_mib):
            out.write(os.urandom(1 << 20))
    name = f"e2e-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(name)
    s3.upload_folder(folder, name, "big")
    for variable, value in s3.env.items():
        monkeypatch.setenv(variable, value)
    source = S3Source(Settings(data_dir=tmp_path / "data"))
    pinned = source.pin(f"s3://{name}/big", "base_model")
    (file,) = pinned.files

    def timed(copy: Any) -> float:
        target = tmp_path / "copy.bin"
        started = time.perf_counter()
        copy(target)
        seconds = time.perf_counter() - started
        assert target.stat().st_size == size_mib << 20
        target.unlink()
        return seconds

    s3_seconds = statistics.median(timed(lambda target: source.download(pinned, file, target, lambda count: None))
                                   for _ in range(3))
    cp_seconds = statistics.median(timed(lambda target: subprocess.run(["cp", folder / "blob.bin", target],
                                                                       check=True)) for _ in range(3))
    print(f"\n[figure] {size_mib} MiB: S3Source.download from local moto {s3_seconds:.2f} s "
          f"({size_mib / s3_seconds:.0f} MiB/s); cp {cp_seconds:.2f} s ({size_mib / cp_seconds:.0f} MiB/s)")
    assert s3.gets(name, file.location or "") == 3


def test_figure_a_registry_merge_against_the_same_merge_from_local_folders(distributed: Cluster,
                                                                           published: Published,
                                                                           reference: Path) -> None:
    """Back to back on one server, the download cache emptied before each registry merge: medians of 3."""
    totals: dict[str, list[float]] = {"registry": [], "local": []}
    downloads = []
    for _ in range(3):
        shutil.rmtree(distributed.cache.root, ignore_errors=True)
        for kind, body in (("registry", published.body), ("local", LOCAL_REQUEST)):
            job = finished(distributed.api, distributed.api.submit({**body, "reuse": False})["id"])  # merged each time
            assert_same_result(job, reference)
            totals[kind].append(job["timings"]["total"])
            if kind == "registry":
                assert job["metrics"]["cache_hits"] == 0 and job["metrics"]["bytes_downloaded"] > 0
                downloads.append(job["timings"]["download"])
    registry, from_local = statistics.median(totals["registry"]), statistics.median(totals["local"])
    print(f"\n[figure] timings.total, median of 3 (distributed, pool kept): registry merge {registry:.2f} s "
          f"(of which download {statistics.median(downloads):.2f} s), same merge from local folders "
          f"{from_local:.2f} s")
