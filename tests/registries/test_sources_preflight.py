"""Remote references through what the API runs before queueing: the allow-list and the references' form, checked
before any registry is asked; then preflight on replicas that hold only configs and safetensors headers, which
plans exactly as the same merge from local folders does."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter_merge.core.preflight import preflight
from adapter_merge.core.problems import Problems
from adapter_merge.core.refs import BadReference
from adapter_merge.core.request import MergeRequest
from adapter_merge.core.settings import Settings
from adapter_merge.core.sources.registry import Sources
from tests.registries.fixtures import TinyModels
from tests.registries.hub import FakeHub
from tests.registries.s3 import S3Server
from tests.registries.test_sources_common import (
    closed_endpoint,
    files_of,
    problem_of,
    settings_for,
    use_env,
    use_hub,
)


def test_a_hub_base_and_an_s3_adapter_plan_as_local_folders_do_without_fetching_tensors(
        hub: FakeHub, s3: S3Server, s3_bucket: str, tiny_models: TinyModels, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    use_env(monkeypatch, hub)
    use_env(monkeypatch, s3)
    hub.add_repo("preflight/base", tiny_models.base)
    s3.upload_folder(tiny_models.adapter, s3_bucket, "loras/one")
    remote = MergeRequest(base_model="hf://preflight/base", adapters=[f"s3://{s3_bucket}/loras/one"])
    local = MergeRequest(base_model=str(tiny_models.base), adapters=[str(tiny_models.adapter)])

    resolved, plan = preflight(remote, Sources(settings_for(tmp_path)), tmp_path / "scratch")
    _, local_plan = preflight(local, Sources(settings_for(tmp_path, model_roots=[tiny_models.base.parent])),
                              tmp_path / "local-scratch")
    assert plan.summary() == local_plan.summary()
    assert [pinned.scheme for pinned in resolved.inputs] == ["hf", "s3"]

    weights = [name for name in files_of(tiny_models.base) if name.endswith(".safetensors")]
    assert all(hub.downloads("preflight/base", name) == 0 < hub.ranged_reads("preflight/base", name)
               for name in weights)
    key = "loras/one/adapter_model.safetensors"
    assert s3.gets(s3_bucket, key) == 0 < s3.gets(s3_bucket, key, ranged=True)


@pytest.fixture
def out_of_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every registry at a closed port: a source that asked one would answer 503, not 422."""
    use_hub(monkeypatch, closed_endpoint(), None)
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed_endpoint())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed_endpoint())


@pytest.mark.usefixtures("out_of_reach")
@pytest.mark.parametrize("ref", ["hf://elsewhere/base", "s3://other-bucket/base", "models:/base/1"])
def test_the_allow_list_refuses_other_sources_before_asking_them(tmp_path: Path, ref: str) -> None:
    sources = Sources(settings_for(tmp_path, allowed_sources="hf://allowed/*"))
    problem = problem_of(lambda: sources.pin(ref, "adapters[0].ref"))
    assert (problem.status, problem.kind, problem.members) == (422, Problems.REFERENCE_FORBIDDEN,
                                                               {"field": "adapters[0].ref", "ref": ref})


@pytest.mark.usefixtures("out_of_reach")
@pytest.mark.parametrize("ref", [
    "hf://", "hf://org", "hf://datasets/org/data", "hf://org/x@", "hf://org/x@main/../y", "hf://org/white space",
    "hf://org/x:main",
    "s3://", "s3:///prefix", "s3://ab/x", "s3://Upper_Case/x", "s3://bucket/a//b", "s3://bucket/../x",
    "s3://bucket/./x",
    "models:/", "models:/name", "models:/name/latest", "models:/name/0", "models:/name@", "models:/name@bad alias",
    "models://name/1", "models:/a/b/1", "models:/name/1/extra",
])
def test_malformed_references_are_422_reference_invalid_before_any_request(tmp_path: Path, ref: str) -> None:
    problem = problem_of(lambda: Sources(settings_for(tmp_path)).pin(ref, "base_model"))
    assert (problem.status, problem.kind, problem.members) == (422, Problems.REFERENCE_INVALID,
                                                               {"field": "base_model", "ref": ref})


def test_a_tenant_may_be_held_to_fewer_sources(tmp_path: Path) -> None:
    """MERGE_TENANT_ALLOWED_SOURCES narrows what one tenant may name; other tenants keep the service's list."""
    settings = Settings(data_dir=tmp_path, allowed_sources="hf://*,s3://*",
                        tenant_allowed_sources={"team-a": "hf://team-a/*"})
    sources = Sources(settings)
    with pytest.raises(BadReference) as caught:
        sources.pin("s3://bucket/model", "base_model", "team-a")
    assert caught.value.kind is Problems.REFERENCE_FORBIDDEN and "team-a" in caught.value.detail
    with pytest.raises(BadReference) as caught:
        sources.pin("hf://team-b/model", "adapters[0].ref", "team-a")
    assert caught.value.members["field"] == "adapters[0].ref"
