"""A real MLflow server: folders published as model versions (run artifacts + `runs:/` source + alias) come back
byte for byte through the mlflow-skinny client, by version, by alias, and after the alias moves."""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow.artifacts
import pytest

from tests.registries.fixtures import TinyModels
from tests.registries.mlflow_server import MlflowServer


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def test_publish_then_resolve_the_alias_and_download_the_version(mlflow_server: MlflowServer,
                                                                 tiny_models: TinyModels, tmp_path: Path) -> None:
    name = unique("lora")
    published = mlflow_server.publish(tiny_models.adapter, name, alias="champion", tags={"source_sha": "abc123"})
    client = mlflow_server.client()
    by_alias = client.get_model_version_by_alias(name, "champion")
    assert (by_alias.version, by_alias.run_id, by_alias.source, by_alias.status) == (
        published.version, published.run_id, f"runs:/{published.run_id}/model", "READY")
    assert by_alias.tags == {"source_sha": "abc123"}
    # The service pins version + run id, then downloads the run's artifacts.
    folder = Path(client.download_artifacts(by_alias.run_id, "model", str(tmp_path / "by-run")))
    assert files_of(folder) == files_of(tiny_models.adapter)
    listed = client.list_artifacts(by_alias.run_id, "model")  # sizes, but no checksums: hash what you download
    sizes = {info.path.removeprefix("model/"): info.file_size for info in listed}
    assert sizes == {path: len(data) for path, data in files_of(tiny_models.adapter).items()}
    # An earlier publish is found by its tag.
    found = client.search_model_versions(f"name = '{name}' and tags.source_sha = 'abc123'")
    assert [version.version for version in found] == [published.version]


def test_models_uris_resolve_through_the_environment(mlflow_server: MlflowServer, tiny_models: TinyModels,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`models:/` URIs are resolved against MLFLOW_REGISTRY_URI/MLFLOW_TRACKING_URI (an explicit client's URI does
    not reach them): `mlflow_server.env` is what a process needs."""
    name = unique("base")
    published = mlflow_server.publish(tiny_models.base, name, alias="prod")
    for key, value in mlflow_server.env.items():
        monkeypatch.setenv(key, value)
    for uri in (published.uri, f"models:/{name}@prod"):
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / uri[-4:])))
        assert files_of(folder) == files_of(tiny_models.base)


def test_moving_an_alias_leaves_the_pinned_version_as_it_was(mlflow_server: MlflowServer, tiny_models: TinyModels,
                                                             tmp_path: Path) -> None:
    name = unique("moving")
    first = mlflow_server.publish(tiny_models.adapter, name, alias="champion")
    second = mlflow_server.publish(tiny_models.base, name)
    assert (first.version, second.version) == ("1", "2")
    client = mlflow_server.client()
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    mlflow_server.set_alias(name, "champion", second.version)
    moved = client.get_model_version_by_alias(name, "champion")
    assert (moved.version, moved.run_id) == ("2", second.run_id)
    pinned = client.get_model_version(name, first.version)
    folder = Path(client.download_artifacts(pinned.run_id, "model", str(tmp_path)))
    assert files_of(folder) == files_of(tiny_models.adapter)
