"""`hf://` references against the fake hub: pinned to a commit, read by ranges, downloaded into the cache and
verified; every missing reference a 422 naming the field (malformed ones: test_sources_preflight); a stalled or
absent hub a 503 in bounded time."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from adapter_merge.core.problems import Problems
from adapter_merge.core.settings import Settings
from adapter_merge.core.sources.base import PinnedFile, PinnedInput
from adapter_merge.core.sources.hub import HubSource
from tests.registries.fixtures import TinyModels
from tests.registries.hub import FakeHub
from tests.registries.test_sources_common import (
    closed_endpoint,
    fetch,
    files_of,
    problem_of,
    settings_for,
    use_env,
    use_hub,
)

SHARD = "model-00001-of-00003.safetensors"


@pytest.fixture
def hub_env(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    use_env(monkeypatch, hub)
    return hub


def pinned_base(hub: FakeHub, repo: str, tiny_models: TinyModels, settings: Settings
                ) -> tuple[HubSource, PinnedInput, PinnedFile]:
    """The tiny base committed to `repo`, pinned, and its first shard."""
    hub.add_repo(repo, tiny_models.base)
    source = HubSource(settings)
    pinned = source.pin(f"hf://{repo}", "base_model")
    return source, pinned, next(file for file in pinned.files if file.path == SHARD)


def test_pin_names_the_commit_and_what_the_hub_vouches_for(hub_env: FakeHub, tiny_models: TinyModels,
                                                            tmp_path: Path) -> None:
    repo = "pin/base"
    first = hub_env.add_repo(repo, tiny_models.base)
    hub_env.tag(repo, "v1", first)
    lora = {f"lora/{path.name}": path for path in tiny_models.adapter.iterdir()}
    second = hub_env.commit(repo, files=lora)
    source = HubSource(settings_for(tmp_path))

    pinned = source.pin(f"hf://{repo}", "base_model")
    assert pinned.version == {"repo": repo, "commit": second} and pinned.scheme == "hf"
    assert {file.path for file in pinned.files} == set(files_of(tiny_models.base)) | set(lora)
    for file in pinned.files:
        committed = hub_env.file(repo, file.location or "")
        assert file.size == committed.size
        assert (file.sha256, file.etag) == ((committed.sha256, None) if committed.lfs else (None, committed.blob_id))
    hub_env.set_branch(repo, "release/2025", first)
    for ref in (f"hf://{repo}@v1", f"hf://{repo}@{first}", f"hf://{repo}@release%2F2025"):
        assert source.pin(ref, "base_model").version["commit"] == first
    adapter = source.pin(f"hf://{repo}@main/lora", "adapters[0].ref")
    assert adapter.version == {"repo": repo, "commit": second, "subfolder": "lora"}
    assert sorted(file.path for file in adapter.files) == sorted(files_of(tiny_models.adapter))


def test_a_branch_that_moves_after_pinning_changes_nothing_downloaded(hub_env: FakeHub, tiny_models: TinyModels,
                                                                      tmp_path: Path) -> None:
    repo = "moving/lora"
    hub_env.add_repo(repo, tiny_models.adapter)
    settings = settings_for(tmp_path)
    pinned = HubSource(settings).pin(f"hf://{repo}", "adapters[0].ref")
    hub_env.commit(repo, files={"adapter_config.json": b'{"r": 99}', "adapter_model.safetensors": b"moved"})
    assert files_of(fetch(settings, pinned, "adapters[0].ref")) == files_of(tiny_models.adapter)
    assert {record.fields.get("commit") for record in hub_env.requests if record.kind == "resolve"} == {
        pinned.version["commit"]}


def test_read_range_reads_a_safetensors_header_and_no_tensor(hub_env: FakeHub, tiny_models: TinyModels,
                                                             tmp_path: Path) -> None:
    repo = "ranges/base"
    source, pinned, shard = pinned_base(hub_env, repo, tiny_models, settings_for(tmp_path))
    (length,) = struct.unpack("<Q", source.read_range(pinned, shard, 0, 8))
    header = json.loads(source.read_range(pinned, shard, 8, length))
    assert "model.embed_tokens.weight" in header
    assert source.read_range(pinned, shard, shard.size - 4, 100) == (tiny_models.base / SHARD).read_bytes()[-4:]
    assert hub_env.ranged_reads(repo, SHARD) == 3 and hub_env.downloads(repo, SHARD) == 0


def test_a_private_repo_needs_the_token_which_never_reaches_the_cdn(hub: FakeHub, tiny_models: TinyModels,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    repo = "private/lora"
    hub.add_repo(repo, tiny_models.adapter, private=True)
    settings = settings_for(tmp_path)
    use_hub(monkeypatch, hub.endpoint, None)
    anonymous = problem_of(lambda: HubSource(settings).pin(f"hf://{repo}", "adapters[0].ref"))
    assert (anonymous.kind, anonymous.members["field"]) == (Problems.REFERENCE_NOT_FOUND, "adapters[0].ref")
    assert "private" in anonymous.detail  # the hub answers 401 RepoNotFound: it does not say which
    use_hub(monkeypatch, hub.endpoint, "hf_not_a_token_of_this_hub")
    refused = problem_of(lambda: HubSource(settings).pin(f"hf://{repo}", "adapters[0].ref"))
    assert refused.kind == Problems.REFERENCE_FORBIDDEN and "hf_not" not in refused.detail

    use_env(monkeypatch, hub)
    hub.requests.clear()
    pinned = HubSource(settings).pin(f"hf://{repo}", "adapters[0].ref")
    assert files_of(fetch(settings, pinned)) == files_of(tiny_models.adapter)
    assert all(record.authorization for record in hub.requests if record.server == "hub")
    assert [record.authorization for record in hub.requests if record.server == "cdn"] == [False]


def test_missing_repo_revision_and_subfolder_are_422_reference_not_found(hub_env: FakeHub, tiny_models: TinyModels,
                                                                         tmp_path: Path) -> None:
    hub_env.add_repo("missing/lora", tiny_models.adapter)
    source = HubSource(settings_for(tmp_path))
    for ref, says in (("hf://missing/nope", "not a model repo"), ("hf://missing/lora@no-such-branch", "no revision"),
                      ("hf://missing/lora@main/no/such/folder", "no files under 'no/such/folder'")):
        problem = problem_of(lambda ref=ref: source.pin(ref, "adapters[1].ref"))
        assert (problem.status, problem.kind, problem.members) == (422, Problems.REFERENCE_NOT_FOUND,
                                                                   {"field": "adapters[1].ref", "ref": ref})
        assert says in problem.detail


def test_a_stalled_hub_trips_the_timeout_after_the_retries(hub_env: FakeHub, tiny_models: TinyModels,
                                                           tmp_path: Path) -> None:
    """Each request gives up after the timeout and is made once more (retries=1): about 2 x 0.5 s plus the backoff,
    for pinning, a ranged read and a download alike."""
    repo = "stalled/base"
    settings = settings_for(tmp_path, download_timeout_seconds=0.5, download_retries=1)
    source, pinned, shard = pinned_base(hub_env, repo, tiny_models, settings)
    hub_env.stall(repo, SHARD)
    for call, kind in ((lambda: source.read_range(pinned, shard, 0, 8), Problems.REGISTRY_UNAVAILABLE),
                       (lambda: source.download(pinned, shard, tmp_path / "shard", lambda count: None),
                        Problems.DOWNLOAD_FAILED)):
        started = time.monotonic()
        problem = problem_of(call)
        assert problem.kind == kind and time.monotonic() - started < 2 * 0.5 + 0.5 + 1.0
        assert problem.members["ref"] == f"hf://{repo}"
    assert problem.members["file"] == SHARD and SHARD in problem.detail
    hub_env.stall(repo)
    started = time.monotonic()
    problem = problem_of(lambda: source.pin(f"hf://{repo}", "base_model"))
    assert (problem.status, problem.kind, problem.retry_after) == (503, Problems.REGISTRY_UNAVAILABLE, 15)
    assert problem.members["field"] == "base_model" and time.monotonic() - started < 2 * 0.5 + 0.5 + 1.0


def test_an_unreachable_hub_is_503(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_hub(monkeypatch, closed_endpoint(), None)
    problem = problem_of(lambda: HubSource(settings_for(tmp_path)).pin("hf://org/base", "base_model"))
    assert (problem.status, problem.kind, problem.members["field"]) == (503, Problems.REGISTRY_UNAVAILABLE,
                                                                        "base_model")
    assert problem.retry_after == 15 and "127.0.0.1" not in problem.detail


def test_a_transfer_cut_off_midway_resumes_where_it_stopped(hub_env: FakeHub, tiny_models: TinyModels,
                                                            tmp_path: Path) -> None:
    repo = "resume/base"
    source, pinned, shard = pinned_base(hub_env, repo, tiny_models, settings_for(tmp_path))
    hub_env.trickle(repo, SHARD, bytes_per_second=2_000_000)
    arrived: list[int] = []

    def progress(count: int) -> None:
        if not arrived:
            hub_env.heal()  # which drops the trickling connection: the rest of the file never comes on it
        arrived.append(count)

    source.download(pinned, shard, tmp_path / SHARD, progress)
    assert (tmp_path / SHARD).read_bytes() == (tiny_models.base / SHARD).read_bytes() and sum(arrived) == shard.size
    ranges = [record.range for record in hub_env.requests if record.server == "cdn"]
    assert len(ranges) == 2 and ranges[0] is None and ranges[1] is not None
    assert 0 < int(ranges[1].removeprefix("bytes=").rstrip("-")) < shard.size


def test_corrupt_bytes_fail_the_caches_sha256_check(hub_env: FakeHub, tiny_models: TinyModels,
                                                    tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    _, pinned, _ = pinned_base(hub_env, "corrupt/base", tiny_models, settings)
    hub_env.corrupt("corrupt/base", SHARD)
    problem = problem_of(lambda: fetch(settings, pinned))
    assert (problem.status, problem.kind, problem.members["file"]) == (502, Problems.DOWNLOAD_CORRUPT, SHARD)
