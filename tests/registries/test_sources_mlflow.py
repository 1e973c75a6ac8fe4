"""`models:/` references against a real MLflow server: pinned to a version and its run, the files those of the
folder that holds the model, read by ranges through the artifact proxy, downloaded into the cache; an alias moved
after pinning changes nothing; every missing reference a 422 naming the field (malformed ones:
test_sources_preflight); an absent server a 503."""

from __future__ import annotations

import json
import shutil
import struct
import uuid
from pathlib import Path

import pytest

from adapter_merge.core.problems import Problems
from adapter_merge.core.sources.mlflow import MlflowSource
from tests.registries.fixtures import TinyModels
from tests.registries.mlflow_server import MlflowServer
from tests.registries.test_sources_common import closed_endpoint, fetch, files_of, problem_of, settings_for, use_env


@pytest.fixture
def mlflow_env(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> MlflowServer:
    use_env(monkeypatch, mlflow_server)
    return mlflow_server


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def test_pin_by_version_and_by_alias_names_the_version_and_its_run(mlflow_env: MlflowServer, tiny_models: TinyModels,
                                                                   tmp_path: Path) -> None:
    name = unique("lora")
    published = mlflow_env.publish(tiny_models.adapter, name, alias="champion")
    source = MlflowSource(settings_for(tmp_path))
    by_version = source.pin(published.uri, "adapters[0].ref")
    by_alias = source.pin(f"models:/{name}@champion", "adapters[0].ref")
    assert by_version.version == by_alias.version == {"name": name, "version": "1", "run_id": published.run_id,
                                                      "source": published.source}
    local = files_of(tiny_models.adapter)
    assert {file.path: file.size for file in by_alias.files} == {path: len(data) for path, data in local.items()}
    assert files_of(fetch(settings_for(tmp_path), by_alias, "adapters[0].ref")) == local


def test_the_one_sub_folder_that_holds_the_model_is_the_folder(mlflow_env: MlflowServer, tiny_models: TinyModels,
                                                               tmp_path: Path) -> None:
    """The layout mlflow.transformers leaves: MLmodel and friends next to the folder with the weights."""
    artifacts = tmp_path / "artifacts"
    (artifacts / "components" / "tokenizer").mkdir(parents=True)
    (artifacts / "MLmodel").write_text("flavors: {}\n")
    (artifacts / "components" / "tokenizer" / "tokenizer.json").write_text("{}")
    shutil.copytree(tiny_models.base, artifacts / "model")
    name = unique("transformers")
    mlflow_env.publish(artifacts, name)
    pinned = MlflowSource(settings_for(tmp_path)).pin(f"models:/{name}/1", "base_model")
    assert {file.path for file in pinned.files} == set(files_of(tiny_models.base))
    assert all((file.location or "").endswith(f"/model/{file.path}") for file in pinned.files)


def test_a_logged_models_version_resolves_to_its_artifacts(mlflow_env: MlflowServer, tiny_models: TinyModels,
                                                            tmp_path: Path) -> None:
    """MLflow 3 registers logged models (`models:/m-...` sources), whose artifacts live outside any run."""
    client = mlflow_env.client()
    experiment = client.create_experiment(unique("logged"))
    logged = client.create_logged_model(experiment, name="lora")
    client.log_model_artifacts(logged.model_id, str(tiny_models.adapter))
    name = unique("logged")
    client.create_registered_model(name)
    client.create_model_version(name, source=f"models:/{logged.model_id}", model_id=logged.model_id)
    settings = settings_for(tmp_path)
    pinned = MlflowSource(settings).pin(f"models:/{name}/1", "adapters[0].ref")
    assert pinned.version == {"name": name, "version": "1", "source": f"models:/{logged.model_id}"}
    assert files_of(fetch(settings, pinned)) == files_of(tiny_models.adapter)


def test_an_alias_moved_after_pinning_changes_nothing_downloaded(mlflow_env: MlflowServer, tiny_models: TinyModels,
                                                                 tmp_path: Path) -> None:
    name = unique("moving")
    mlflow_env.publish(tiny_models.adapter, name, alias="champion")
    settings = settings_for(tmp_path)
    pinned = MlflowSource(settings).pin(f"models:/{name}@champion", "adapters[0].ref")
    second = mlflow_env.publish(tiny_models.base, name)
    mlflow_env.set_alias(name, "champion", second.version)
    assert MlflowSource(settings).pin(f"models:/{name}@champion", "adapters[0].ref").version["version"] == "2"
    assert files_of(fetch(settings, pinned)) == files_of(tiny_models.adapter)


def test_read_range_reads_a_safetensors_header_through_the_artifact_proxy(mlflow_env: MlflowServer,
                                                                          tiny_models: TinyModels,
                                                                          tmp_path: Path) -> None:
    name = unique("ranges")
    mlflow_env.publish(tiny_models.adapter, name)
    source = MlflowSource(settings_for(tmp_path))
    pinned = source.pin(f"models:/{name}/1", "adapters[0].ref")
    weights = next(file for file in pinned.files if file.path.endswith(".safetensors"))
    (length,) = struct.unpack("<Q", source.read_range(pinned, weights, 0, 8))
    header = json.loads(source.read_range(pinned, weights, 8, length))
    assert any(key.endswith("lora_A.weight") for key in header)
    whole = (tiny_models.adapter / weights.path).read_bytes()
    assert source.read_range(pinned, weights, weights.size - 5, 100) == whole[-5:]


def test_a_missing_model_version_or_alias_is_422_reference_not_found(mlflow_env: MlflowServer,
                                                                     tiny_models: TinyModels, tmp_path: Path) -> None:
    name = unique("present")
    mlflow_env.publish(tiny_models.adapter, name, alias="champion")
    source = MlflowSource(settings_for(tmp_path))
    for ref in (f"models:/{unique('absent')}/1", f"models:/{unique('absent')}@champion", f"models:/{name}/2",
                f"models:/{name}@challenger"):
        problem = problem_of(lambda ref=ref: source.pin(ref, "adapters[0].ref"))
        assert (problem.status, problem.kind, problem.members) == (422, Problems.REFERENCE_NOT_FOUND,
                                                                   {"field": "adapters[0].ref", "ref": ref})


def test_an_unreachable_tracking_server_is_503(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed_endpoint())
    problem = problem_of(lambda: MlflowSource(settings_for(tmp_path)).pin("models:/base/1", "base_model"))
    assert (problem.status, problem.kind, problem.retry_after) == (503, Problems.REGISTRY_UNAVAILABLE, 15)
    assert problem.members == {"field": "base_model", "ref": "models:/base/1"} and "127.0.0.1" not in problem.detail
