"""Publishing to S3 through the real service (embedded, and distributed with a Celery worker), read back with boto3
from moto's S3 server (tests/registries/fixtures.py):

    - every merged file lands under the prefix with the job's sha256 (bytes fetched and hashed), a SHA256 checksum
      S3 computed (the 7 MB shard as a multipart upload), lineage metadata, `merge_lineage.json`, and the manifest
      last; the job shows where it went, the publishing phase and its timing;
    - an identical request publishes nothing again: the manifest stays the one version it was; one that shares an
      earlier job's result (reuse) publishes it without merging;
    - the lineage names a registry input (an S3 adapter) as given, as pinned and by every object's sha256;
    - another model for the same prefix fails the job with publish-conflict, a missing bucket with publish-failed,
      and both keep their merged files;
    - two different models publishing to one empty prefix at the same time, from one service or from two that share
      no job store: one publishes, the other fails with publish-conflict having written nothing there; the same
      request sent to two services at once succeeds on both, with one manifest; a claim another request left in
      the prefix refuses a different model until it is deleted;
    - a worker SIGKILLed mid-publish (a multipart upload open, no manifest yet): the lease rerun aborts the orphaned
      upload and publishes exactly one manifest; a job cancelled mid-publish aborts its upload and writes no manifest;
    - a run whose publish lock another run took (its renewals missed the lease) stops the same way and fails with
      publish-failed, keeping its merged files;
    - targets the service may not publish to are refused at submission (422 naming the field).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.registries.publishing import (
    PACE,
    Cluster,
    Deployment,
    Models,
    artifact_digests,
    assert_kept,
    assert_lineage,
    assert_published_progress,
    cluster,
    digest_of,
    embedded,
    finished,
    merge_request,
    publish_env,
    sha256,
    unique,
)
from tests.registries.s3 import S3Server, sha256_base64
from tests.service.checks import problem
from tests.service.harness import FINISHED, Api

ALLOWED = "s3://pub-*"
MANIFEST = "merge_manifest.json"
LINEAGE = "merge_lineage.json"
CLAIM = ".merge-publishing.json"


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    name = unique("pub")
    s3_server.create_bucket(name, versioned=True)
    return name


@pytest.fixture(scope="module")
def service(models: Models, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with embedded(models, tmp_path_factory.mktemp("publish-s3"), publish_env(s3_server.env, ALLOWED)) as deployment:
        yield deployment


@pytest.fixture
def api(service: Deployment) -> Api:
    return service.api


@pytest.fixture(scope="module")
def distributed(models: Models, s3_server: S3Server, redis_namespace: dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    env = publish_env(s3_server.env, ALLOWED, pace=PACE)
    with cluster(models, tmp_path_factory.mktemp("publish-s3-cluster"), env, redis_namespace) as running:
        yield running


@pytest.fixture(scope="module")
def racing(models: Models, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Two merges at once, each publishing slowly enough to overlap the other's publish."""
    env = {**publish_env(s3_server.env, ALLOWED, pace=PACE), "MERGE_WORKER_CONCURRENCY": "2"}
    with embedded(models, tmp_path_factory.mktemp("publish-s3-racing"), env) as deployment:
        yield deployment


def objects(s3: S3Server, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
    """Key (relative to the prefix) -> HEAD with checksums, of every object under the prefix."""
    client = s3.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/").get("Contents", [])
    return {item["Key"].removeprefix(f"{prefix}/"): client.head_object(Bucket=bucket, Key=item["Key"],
                                                                        ChecksumMode="ENABLED") for item in listed}


def open_uploads(s3: S3Server, bucket: str, prefix: str) -> list[str]:
    return [upload["Key"] for upload in s3.client().list_multipart_uploads(Bucket=bucket, Prefix=f"{prefix}/")
            .get("Uploads", [])]


def manifest_versions(s3: S3Server, bucket: str, prefix: str) -> list[str]:
    versions = s3.client().list_object_versions(Bucket=bucket, Prefix=f"{prefix}/{MANIFEST}").get("Versions", [])
    return [version["VersionId"] for version in versions]


def assert_published(s3: S3Server, bucket: str, prefix: str, job: dict[str, Any]) -> None:
    """Under the prefix: every artifact with the job's bytes, S3's checksum and lineage metadata, plus the lineage
    file; nothing else, and no upload left open."""
    client, digests = s3.client(), artifact_digests(job)
    found = objects(s3, bucket, prefix)
    assert set(found) == {*digests, LINEAGE}
    for path, expected in digests.items():
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/{path}")["Body"].read()
        assert sha256(body) == expected, path
        head = found[path]
        assert head["Metadata"]["sha256"] == expected and head["Metadata"]["request-digest"] == digest_of(job)
        assert head["Metadata"]["job-id"] == job["id"] and head["Metadata"]["lineage"] == LINEAGE
        checksum = head["ChecksumSHA256"]
        if head["ContentLength"] > 5 << 20:  # multipart: a checksum of the part checksums
            assert s3.requests.count(kind="UploadPart", key=f"{bucket}/{prefix}/{path}") >= 2, path
        else:
            assert checksum == sha256_base64(expected), path
    lineage = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/{LINEAGE}")["Body"].read())
    assert_lineage(lineage, job)
    assert open_uploads(s3, bucket, prefix) == []
    assert job["published"]["uri"] == f"s3://{bucket}/{prefix}"
    assert job["published"]["url"] == f"s3://{bucket}/{prefix}/{MANIFEST}"
    assert job["published"]["version"] == found[MANIFEST]["VersionId"]


def test_the_merged_folder_lands_under_the_prefix_with_checksums_lineage_and_the_manifest_last(
        api: Api, s3: S3Server, bucket: str) -> None:
    prefix = unique("models/support-bot")
    job = finished(api, api.submit(merge_request(f"s3://{bucket}/{prefix}"))["id"])
    assert_published(s3, bucket, prefix, job)
    assert_published_progress(job)
    puts = [record.key for record in s3.requests if record.method in ("PUT", "POST") and record.status == 200
            and record.key and record.key.startswith(f"{bucket}/{prefix}/")]
    assert puts[-1] == f"{bucket}/{prefix}/{MANIFEST}" and puts[-2] == f"{bucket}/{prefix}/{LINEAGE}"

    again = finished(api, api.submit(merge_request(f"s3://{bucket}/{prefix}", reuse=False))["id"])
    assert again["published"] == job["published"] and again["request_digest"] == job["request_digest"]
    assert manifest_versions(s3, bucket, prefix) == [job["published"]["version"]]


def test_another_model_at_the_prefix_fails_the_job_and_keeps_its_merge(service: Deployment, s3: S3Server,
                                                                        bucket: str) -> None:
    api, prefix = service.api, unique("models/taken")
    first = finished(api, api.submit(merge_request(f"s3://{bucket}/{prefix}"))["id"])
    other = finished(api, api.submit(merge_request(f"s3://{bucket}/{prefix}", weight=0.5))["id"], "failed")
    error = other["error"]
    assert (error["type"].rsplit(":", 1)[1], error["status"], error["field"]) == ("publish-conflict", 409,
                                                                                 "publish.to")
    assert_kept(service, other)
    assert manifest_versions(s3, bucket, prefix) == [first["published"]["version"]]
    assert objects(s3, bucket, prefix)[MANIFEST]["Metadata"]["request-digest"] == digest_of(first)


def assert_one_whole_model(s3: S3Server, bucket: str, prefix: str, jobs: list[dict[str, Any]]) -> None:
    """Of two jobs that raced for the prefix, one published and the other failed with publish-conflict without
    having written an object there: every version under the prefix is the winner's."""
    assert sorted(job["status"] for job in jobs) == ["failed", "succeeded"], [job["error"] for job in jobs]
    (winner,) = [job for job in jobs if job["status"] == "succeeded"]
    (loser,) = [job for job in jobs if job["status"] == "failed"]
    assert loser["error"]["type"].rsplit(":", 1)[1] == "publish-conflict", loser["error"]
    assert_published(s3, bucket, prefix, winner)
    client = s3.client()
    versions = client.list_object_versions(Bucket=bucket, Prefix=f"{prefix}/").get("Versions", [])
    writers = {client.head_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])["Metadata"]
               ["job-id"] for version in versions}
    assert writers == {winner["id"]}


def test_two_models_racing_for_one_prefix_leave_one_whole_model(racing: Deployment, s3: S3Server,
                                                                bucket: str) -> None:
    """Two different requests for one empty prefix, publishing at the same time: one publishes, and the other fails
    with publish-conflict without having written an object there (every version under the prefix is the winner's)."""
    api, prefix = racing.api, unique("models/raced")
    ids = [api.submit(merge_request(f"s3://{bucket}/{prefix}", weight=weight))["id"] for weight in (1.0, 0.5)]
    jobs = [api.wait(job_id, FINISHED, 120) for job_id in ids]
    assert_one_whole_model(s3, bucket, prefix, jobs)


def test_two_deployments_racing_for_one_prefix_leave_one_whole_model(models: Models, s3: S3Server, bucket: str,
                                                                     tmp_path: Path) -> None:
    """Two services that share no job store (so no publish lock) publish two models to one empty prefix at the
    same time: the prefix's claim, a conditional write S3 decides, lets one publish; the other fails with
    publish-conflict having written nothing there. No claim is left behind."""
    prefix = unique("models/two-services")
    env = publish_env(s3.env, ALLOWED, pace=PACE)
    with embedded(models, tmp_path / "one", env) as one, embedded(models, tmp_path / "two", env) as two:
        submitted = [(api, api.submit(merge_request(f"s3://{bucket}/{prefix}", weight=weight))["id"])
                     for api, weight in ((one.api, 1.0), (two.api, 0.5))]
        jobs = [api.wait(job_id, FINISHED, 120) for api, job_id in submitted]
    assert_one_whole_model(s3, bucket, prefix, jobs)


def test_two_deployments_publishing_one_request_at_once_both_succeed(models: Models, s3: S3Server, bucket: str,
                                                                      tmp_path: Path) -> None:
    """The same request sent to two services at once: the second takes over the first's claim (same digest, same
    files) without aborting its upload, and both jobs answer with the one manifest that went up first."""
    prefix = unique("models/same-twice")
    env = publish_env(s3.env, ALLOWED, pace=PACE)
    with embedded(models, tmp_path / "one", env) as one, embedded(models, tmp_path / "two", env) as two:
        submitted = [(api, api.submit(merge_request(f"s3://{bucket}/{prefix}", weight=0.8))["id"])
                     for api in (one.api, two.api)]
        jobs = [api.wait(job_id, FINISHED, 120) for api, job_id in submitted]
    assert [job["status"] for job in jobs] == ["succeeded", "succeeded"], [job["error"] for job in jobs]
    assert jobs[0]["published"] == jobs[1]["published"]
    assert manifest_versions(s3, bucket, prefix) == [jobs[0]["published"]["version"]]
    assert open_uploads(s3, bucket, prefix) == [] and CLAIM not in objects(s3, bucket, prefix)


def test_a_claim_left_by_another_request_keeps_the_prefix_until_it_is_deleted(service: Deployment, s3: S3Server,
                                                                               bucket: str) -> None:
    """A publisher elsewhere died while writing into the prefix (its claim is there, no manifest): a different
    model's publish fails with publish-conflict naming the claim and writes nothing; once the claim is deleted,
    the same request publishes (sharing the earlier job's merge)."""
    api, prefix = service.api, unique("models/claimed")
    claim = f"{prefix}/{CLAIM}"
    client = s3.client()
    client.put_object(Bucket=bucket, Key=claim, Body=b"{}", Metadata={"request-digest": "f" * 64, "job-id": "gone"})
    refused = finished(api, api.submit(merge_request(f"s3://{bucket}/{prefix}", weight=0.9))["id"], "failed")
    error = refused["error"]
    assert (error["type"].rsplit(":", 1)[1], error["field"]) == ("publish-conflict", "publish.to"), error
    assert claim in error["detail"] and "f" * 64 in error["detail"]
    assert set(objects(s3, bucket, prefix)) == {CLAIM}

    client.delete_object(Bucket=bucket, Key=claim)
    job = finished(api, api.submit(merge_request(f"s3://{bucket}/{prefix}", weight=0.9))["id"])
    assert job["reused_from"] == refused["id"]
    assert_published(s3, bucket, prefix, job)


def test_a_worker_killed_mid_publish_leaves_no_manifest_and_the_rerun_one_with_no_open_upload(
        distributed: Cluster, s3: S3Server, bucket: str) -> None:
    prefix = unique("models/killed")
    job_id = distributed.api.submit(merge_request(f"s3://{bucket}/{prefix}"))["id"]
    distributed.api.wait(job_id, lambda job: job["progress"]["phase"] == "publishing"
                         and bool(open_uploads(s3, bucket, prefix)), timeout=60)
    distributed.kill_worker()
    assert open_uploads(s3, bucket, prefix) and MANIFEST not in objects(s3, bucket, prefix)

    distributed.start_worker()
    job = finished(distributed.api, job_id)
    assert job["attempts"] == 2
    assert_published(s3, bucket, prefix, job)
    assert manifest_versions(s3, bucket, prefix) == [job["published"]["version"]]
    assert not (distributed.data_dir / "artifacts" / job_id / "attempt-1").exists()


def test_the_lineage_names_a_registry_input_as_given_and_as_pinned(api: Api, models: Models, s3: S3Server,
                                                                   bucket: str) -> None:
    """An adapter fetched from S3: the lineage holds its reference, its pin (bucket, prefix, listing digest) and
    every object's sha256 (S3's checksum of a single-part upload)."""
    source, prefix = unique("inputs/lora"), unique("models/from-s3")
    uploaded = s3.upload_folder(models.root / "lora", bucket, source)
    adapter = f"s3://{bucket}/{source}"
    job = finished(api, api.submit(merge_request(f"s3://{bucket}/{prefix}", adapter=adapter))["id"])
    assert_published(s3, bucket, prefix, job)
    lineage = json.loads(s3.client().get_object(Bucket=bucket, Key=f"{prefix}/{LINEAGE}")["Body"].read())
    (entry,) = lineage["adapters"]
    assert entry["ref"] == adapter and entry["pinned"] == job["inputs"][1]["version"]
    assert entry["pinned"]["bucket"] == bucket and entry["pinned"]["prefix"] == source
    assert entry["files"] == {obj.key.removeprefix(f"{source}/"): f"sha256:{obj.sha256}" for obj in uploaded}


def test_a_missing_bucket_fails_the_job_with_publish_failed_and_keeps_its_merge(service: Deployment) -> None:
    api = service.api
    job = finished(api, api.submit(merge_request(f"s3://{unique('pub-missing')}/models/x"))["id"], "failed")
    error = job["error"]
    assert (error["type"].rsplit(":", 1)[1], error["status"], error["field"]) == ("publish-failed", 502,
                                                                                 "publish.to")
    assert "bucket does not exist" in error["detail"]
    assert_kept(service, job)


def test_trying_a_failed_publish_again_publishes_the_kept_merge_without_merging(
        service: Deployment, s3_server: S3Server, s3: S3Server) -> None:
    """A job whose merge succeeded but whose publishing failed keeps its merge; once the target is fixed, the same
    request shares that merge and only publishes."""
    api, name = service.api, unique("pub-later")
    failed = finished(api, api.submit(merge_request(f"s3://{name}/models/x", weight=0.25))["id"], "failed")
    s3_server.create_bucket(name, versioned=True)
    job = finished(api, api.submit(merge_request(f"s3://{name}/models/x", weight=0.25))["id"])
    assert job["reused_from"] == failed["id"] and job["timings"]["merge"] is None
    assert_published(s3, name, "models/x", job)


def test_a_shared_result_is_published_without_merging_again(api: Api, s3: S3Server, bucket: str) -> None:
    """An identical request (reuse on) that publishes elsewhere shares the earlier job's result and only publishes."""
    first_prefix, prefix = unique("models/shared-first"), unique("models/shared")
    first = finished(api, api.submit(merge_request(f"s3://{bucket}/{first_prefix}", weight=0.75))["id"])
    job = finished(api, api.submit(merge_request(f"s3://{bucket}/{prefix}", weight=0.75))["id"])
    assert job["reused_from"] == first["id"] and job["metrics"]["cache_hit"] is True
    assert job["timings"]["merge"] is None and job["timings"]["publish"] > 0
    assert artifact_digests(job) == artifact_digests(first)
    assert_published(s3, bucket, prefix, job)


def test_a_job_cancelled_while_publishing_stops_and_leaves_nothing_a_reader_trusts(
        distributed: Cluster, s3: S3Server, bucket: str) -> None:
    prefix = unique("models/cancelled")
    job_id = distributed.api.submit(merge_request(f"s3://{bucket}/{prefix}", weight=0.3))["id"]
    distributed.api.wait(job_id, lambda job: job["progress"]["phase"] == "publishing"
                         and bool(open_uploads(s3, bucket, prefix)), timeout=60)
    assert distributed.api.http.post(f"/jobs/{job_id}/cancel").status_code == 202
    job = finished(distributed.api, job_id, "cancelled", timeout=10)
    assert job["progress"]["bytes_done"] < job["progress"]["bytes_total"] and job["published"] is None
    assert MANIFEST not in objects(s3, bucket, prefix) and open_uploads(s3, bucket, prefix) == []
    assert not (distributed.data_dir / "artifacts" / job_id).exists() or not any(
        (distributed.data_dir / "artifacts" / job_id).iterdir())


def test_a_run_that_loses_the_publish_lock_stops_publishing_and_keeps_its_merge(
        distributed: Cluster, s3: S3Server, bucket: str) -> None:
    """The store gives the target's lock to another run mid-upload (as it does once the holder's renewals miss a
    lease): the publish stops at its next chunk, aborts its upload and writes no manifest; the job fails with
    publish-failed, naming the target, and keeps its merged files for a retry."""
    prefix = unique("models/lost-lock")
    to = f"s3://{bucket}/{prefix}"
    job_id = distributed.api.submit(merge_request(to, weight=0.7))["id"]
    distributed.api.wait(job_id, lambda job: job["progress"]["phase"] == "publishing"
                         and bool(open_uploads(s3, bucket, prefix)), timeout=60)
    store = redis.Redis.from_url(distributed.env["MERGE_REDIS_URL"])
    lock = f"{distributed.env['MERGE_REDIS_PREFIX']}:lock:publish:{to}"
    try:
        assert store.get(lock) is not None, "the running publish holds its target's lock"
        store.set(lock, "another-worker:another-job:1", px=60_000)
        job = finished(distributed.api, job_id, "failed", timeout=10)
    finally:
        store.delete(lock)
        store.close()
    error = job["error"]
    assert (error["type"].rsplit(":", 1)[1], error["status"], error["field"]) == ("publish-failed", 502,
                                                                                 "publish.to")
    assert "lost the target's publish lock" in error["detail"] and to in error["detail"]
    assert job["progress"]["bytes_done"] < job["progress"]["bytes_total"] and job["published"] is None
    assert MANIFEST not in objects(s3, bucket, prefix) and open_uploads(s3, bucket, prefix) == []
    assert_kept(distributed, job)


@pytest.mark.parametrize(("publish", "status", "slug", "field"), [
    ({"to": "s3://elsewhere/models/x"}, 422, "reference-forbidden", "publish.to"),
    ({"to": "s3://pub-bucket"}, 422, "reference-invalid", "publish.to"),
    ({"to": "s3://pub-bucket/x", "alias": "champion"}, 422, "reference-invalid", "publish.alias"),
    ({"to": "ftp://pub-bucket/x"}, 422, "reference-invalid", "publish.to"),
    ({"to": "/srv/models/out"}, 422, "reference-invalid", "publish.to"),
])
def test_a_target_the_service_may_not_publish_to_is_refused_at_submission(
        api: Api, publish: dict[str, str], status: int, slug: str, field: str) -> None:
    body = {**merge_request("unused"), "publish": publish}
    refused = problem(api.http.post("/merge", json=body), status, field)
    assert (refused["type"].rsplit(":", 1)[1], refused["field"]) == (slug, field)


def test_a_tenant_may_publish_only_where_its_patterns_allow(models: Models, s3_server: S3Server, bucket: str,
                                                            tmp_path: Path) -> None:
    env = {**publish_env(s3_server.env, ALLOWED), "MERGE_TENANT_ALLOWED_SOURCES": json.dumps(
        {"default": f"s3://{bucket}/team-a/*"})}
    with embedded(models, tmp_path, env) as deployment:
        api = deployment.api
        refused = problem(api.http.post("/merge", json=merge_request(f"s3://{bucket}/team-b/x")), 422, "tenant")
        assert (refused["type"].rsplit(":", 1)[1], refused["field"]) == ("reference-forbidden", "publish.to")
        assert api.http.post("/merge", json=merge_request(f"s3://{bucket}/team-a/x")).status_code == 202
