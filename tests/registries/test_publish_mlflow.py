"""Publishing to an MLflow registry through the real service (embedded, and distributed with a Celery worker), read
back with MLflow's own client from a real `mlflow server` (tests/registries/fixtures.py):

    - `models:/NAME` gets version 1 (the registered model created), READY, from `runs:/<run>/model`, with the lineage
      as version and run tags, `merge_lineage.json` beside the model, every file with the job's sha256 (downloaded
      and hashed), and the alias on it; another request moves the alias to its version 2;
    - an identical request publishes nothing again: it answers with the version it made; two at the same time
      (neither reusing the other's merge) make one version and one run;
    - the lineage names a registry input (an MLflow adapter by alias) by its version and run;
    - a registry out of reach fails the job with registry-unavailable (503), its merge kept;
    - a worker SIGKILLed mid-publish: the lease rerun ends with exactly one version and one run of the digest;
    - a target the service may not publish to is refused at submission (422 naming the field).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from tests.registries.mlflow_server import MlflowServer
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
from tests.registries.test_sources_common import closed_endpoint
from tests.service.checks import problem

ALLOWED = "models:/pub-*"
EXPERIMENT = "adapter-merge"


@pytest.fixture(scope="module")
def service(models: Models, mlflow_server: MlflowServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    env = publish_env(mlflow_server.env, ALLOWED)
    with embedded(models, tmp_path_factory.mktemp("publish-mlflow"), env) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def distributed(models: Models, mlflow_server: MlflowServer, redis_namespace: dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    env = publish_env(mlflow_server.env, ALLOWED, pace=PACE)
    with cluster(models, tmp_path_factory.mktemp("publish-mlflow-cluster"), env, redis_namespace) as running:
        yield running


@pytest.fixture(scope="module")
def racing(models: Models, mlflow_server: MlflowServer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Two merges at once, each publishing slowly enough to overlap the other's publish."""
    env = {**publish_env(mlflow_server.env, ALLOWED, pace=PACE), "MERGE_WORKER_CONCURRENCY": "2"}
    with embedded(models, tmp_path_factory.mktemp("publish-mlflow-racing"), env) as deployment:
        yield deployment


def runs_of(client: MlflowClient, digest: str) -> list[Any]:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.request_digest = '{digest}'")


def assert_published(client: MlflowClient, name: str, job: dict[str, Any], version: str, tmp_path: Path) -> None:
    """Version `version` of `name` is the job's model: READY, from its run's `model/` folder, tagged with its lineage,
    every file with the job's bytes."""
    assert job["published"]["uri"] == f"models:/{name}" and job["published"]["version"] == version
    assert job["published"]["url"].endswith(f"/#/models/{name}/versions/{version}")
    model_version = client.get_model_version(name, version)
    assert model_version.status == "READY"
    assert model_version.source == f"runs:/{model_version.run_id}/model"
    digests = artifact_digests(job)
    expected_tags = {"request_digest": digest_of(job), "job_id": job["id"], "base": "base",
                     "adapter_0": job["request"]["adapters"][0]["ref"],
                     "adapter_0_weight": repr(job["request"]["adapters"][0]["weight"]),
                     "manifest_sha256": digests["merge_manifest.json"]}
    run = client.get_run(model_version.run_id)
    for tags in (model_version.tags, run.data.tags):
        assert {key: tags.get(key) for key in expected_tags} == expected_tags
        assert json.loads(tags["base_pinned"]) == job["inputs"][0]["version"]
    assert run.data.tags["artifacts_complete"] == "true" and run.info.status == "FINISHED"

    folder = Path(client.download_artifacts(model_version.run_id, "model", str(tmp_path / f"v{version}")))
    assert {str(path.relative_to(folder)): sha256(path.read_bytes()) for path in folder.rglob("*")
            if path.is_file()} == digests
    lineage = Path(client.download_artifacts(model_version.run_id, "merge_lineage.json", str(tmp_path)))
    assert_lineage(json.loads(lineage.read_text()), job)


def test_a_new_version_with_lineage_and_the_alias_moved_once_ready(service: Deployment, mlflow_server: MlflowServer,
                                                                    tmp_path: Path) -> None:
    api, client, name = service.api, mlflow_server.client(), unique("pub-bot")
    first = finished(api, api.submit(merge_request(f"models:/{name}", alias="champion"))["id"])
    assert_published(client, name, first, "1", tmp_path)
    assert_published_progress(first)
    assert client.get_model_version_by_alias(name, "champion").version == "1"

    second = finished(api, api.submit(merge_request(f"models:/{name}", alias="champion", weight=0.5))["id"])
    assert_published(client, name, second, "2", tmp_path)
    assert client.get_model_version_by_alias(name, "champion").version == "2"

    again = finished(api, api.submit(merge_request(f"models:/{name}", reuse=False))["id"])
    assert again["request_digest"] == first["request_digest"] and again["published"] == first["published"]
    assert sorted(version.version for version in client.search_model_versions(f"name = '{name}'")) == ["1", "2"]
    assert len(runs_of(client, digest_of(first))) == 1


def test_identical_requests_publishing_at_once_make_one_version_and_one_run(racing: Deployment,
                                                                           mlflow_server: MlflowServer) -> None:
    api, client, name = racing.api, mlflow_server.client(), unique("pub-twins")
    ids = [api.submit(merge_request(f"models:/{name}", reuse=False))["id"] for _ in range(2)]
    jobs = [finished(api, job_id) for job_id in ids]
    assert [job["published"]["version"] for job in jobs] == ["1", "1"]
    assert [version.version for version in client.search_model_versions(f"name = '{name}'")] == ["1"]
    assert len(runs_of(client, digest_of(jobs[0]))) == 1


def test_a_worker_killed_mid_publish_ends_with_one_version_and_one_run(
        distributed: Cluster, mlflow_server: MlflowServer, tmp_path: Path) -> None:
    client, name = mlflow_server.client(), unique("pub-killed")
    # A merge of its own (weight): a run of the digest with its upload complete would be reused, nothing sent.
    job_id = distributed.api.submit(merge_request(f"models:/{name}", alias="live", weight=0.25))["id"]
    distributed.api.wait(job_id, lambda job: job["progress"]["phase"] == "publishing"
                         and 0 < job["progress"]["bytes_done"] < job["progress"]["bytes_total"], timeout=60)
    distributed.kill_worker()
    assert client.search_model_versions(f"name = '{name}'") == []

    distributed.start_worker()
    job = finished(distributed.api, job_id)
    assert job["attempts"] == 2
    assert_published(client, name, job, "1", tmp_path)
    assert [version.version for version in client.search_model_versions(f"name = '{name}'")] == ["1"]
    assert len(runs_of(client, digest_of(job))) == 1
    assert client.get_model_version_by_alias(name, "live").version == "1"


def test_the_lineage_names_a_registry_input_by_version_and_run(service: Deployment, models: Models,
                                                              mlflow_server: MlflowServer, tmp_path: Path) -> None:
    """An adapter taken from the registry by alias: the tags name it as given and as pinned (version, run id)."""
    client, name, source = mlflow_server.client(), unique("pub-from-registry"), unique("pub-input")
    adapter_version = mlflow_server.publish(models.root / "lora2", source, alias="champion")
    adapter = f"models:/{source}@champion"
    job = finished(service.api, service.api.submit(merge_request(f"models:/{name}", adapter=adapter))["id"])
    assert_published(client, name, job, "1", tmp_path)
    tags = client.get_model_version(name, "1").tags
    pinned = json.loads(tags["adapter_0_pinned"])
    assert tags["adapter_0"] == adapter and pinned == job["inputs"][1]["version"]
    assert (pinned["version"], pinned["run_id"]) == (adapter_version.version, adapter_version.run_id)


def test_a_registry_out_of_reach_fails_the_job_with_registry_unavailable(models: Models, tmp_path: Path) -> None:
    env = publish_env({"MLFLOW_TRACKING_URI": closed_endpoint(), "MLFLOW_DISABLE_TELEMETRY": "true"}, ALLOWED)
    with embedded(models, tmp_path, env) as deployment:
        job = finished(deployment.api, deployment.api.submit(merge_request("models:/pub-nowhere"))["id"], "failed")
        error = job["error"]
        assert (error["type"].rsplit(":", 1)[1], error["status"], error["field"]) == ("registry-unavailable", 503,
                                                                                     "publish.to")
        assert_kept(deployment, job)


@pytest.mark.parametrize(("publish", "slug", "field"), [
    ({"to": "models:/elsewhere"}, "reference-forbidden", "publish.to"),
    ({"to": "models:/pub-bot/3"}, "reference-invalid", "publish.to"),
    ({"to": "models:/pub-bot@champion"}, "reference-invalid", "publish.to"),
    ({"to": "models:/pub-bot", "alias": "bad alias"}, "validation-error", "publish.alias"),
])
def test_a_target_the_service_may_not_publish_to_is_refused_at_submission(
        service: Deployment, publish: dict[str, str], slug: str, field: str) -> None:
    body = {**merge_request("unused"), "publish": publish}
    refused = problem(service.api.http.post("/merge", json=body), 422)
    assert refused["type"].rsplit(":", 1)[1] == slug
    assert field in (refused.get("field"), *(error.get("field") for error in refused.get("errors", [])))
