"""`hf://` publishing against the fake hub, through huggingface_hub's own commit protocol (create_repo,
create_branch, preupload, the LFS batch API with basic and multipart uploads, the NDJSON commit with its parent):
the merged folder is one commit whose files the client downloads byte for byte, with a model card the hub's model
tree reads; a rerun finds its commit instead of making another, even when the first answer was lost; a branch
that moves in between is handled; an unreachable or stalled hub is a 503, a refusing one a 502 naming the repo.
Then through the real service: embedded (job.published.version is the hub's commit, the files and lineage read back
with the client), and distributed with the worker SIGKILLed mid-upload (the lease rerun makes exactly one commit)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError

from adapter_merge.core.jobs import Published
from adapter_merge.core.problems import Problems
from adapter_merge.core.publish.base import LINEAGE_FILE, Lineage, LineageInput, lineage_input
from adapter_merge.core.publish.hub import HubTarget
from adapter_merge.core.request import PublishSpec
from adapter_merge.core.settings import Settings
from adapter_merge.core.sources.hub import HubSource
from adapter_merge.worker.engine import AdapterSpec, MergeCancelled, merge
from adapter_merge.worker.engine.manifest import engine_version
from tests.registries.fixtures import TinyModels
from tests.registries.hub import FakeHub
from tests.registries.publishing import (
    PACE,
    Cluster,
    Deployment,
    Models,
    artifact_digests,
    assert_lineage,
    assert_published_progress,
    cluster,
    digest_of,
    embedded,
    finished,
    merge_request,
    publish_env,
    unique,
)
from tests.registries.test_sources_common import closed_endpoint, problem_of, settings_for, use_env, use_hub

BASE_REPO = "pub/base"


def merge_tiny(tiny_models: TinyModels, weight: float, out: Path) -> Path:
    """The tiny base merged with its LoRA at `weight` by the engine, as a job's result folder."""
    return merge(tiny_models.base, [AdapterSpec(tiny_models.adapter, weight)], out).output_dir


@pytest.fixture(scope="module")
def merged(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return merge_tiny(tiny_models, 0.5, tmp_path_factory.mktemp("merged") / "out")


@pytest.fixture(scope="module")
def base_on_hub(hub_server: FakeHub, tiny_models: TinyModels) -> str:
    hub_server.add_repo(BASE_REPO, tiny_models.base)
    return BASE_REPO


@pytest.fixture
def hub_env(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    use_env(monkeypatch, hub)
    return hub


def lineage_of(merged: Path, settings: Settings, digest: str, job_id: str = "job-1") -> Lineage:
    """What the runner would hand the target: the hub base as pinned, the local adapter, the folder's sha256s."""
    base = lineage_input(HubSource(settings).pin(f"hf://{BASE_REPO}", "base_model"))
    adapter = LineageInput(ref="support-bot", pinned={"path": "support-bot"}, weight=0.5)
    files = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in merged.iterdir()}
    return Lineage(job_id=job_id, request_digest=digest, engine_version=engine_version(), base=base,
                   adapters=[adapter], options={"output_dtype": "auto", "max_shard_size": None},
                   manifest_sha256=files)


def publish(target: HubTarget, to: str, merged: Path, lineage: Lineage, sent: list[int] | None = None) -> Published:
    return target.publish(PublishSpec(to=to), merged, lineage, (sent if sent is not None else []).append)


def total_bytes(merged: Path, lineage: Lineage) -> int:
    return sum((merged / name).stat().st_size for name in lineage.manifest_sha256)


def commits_with(hub: FakeHub, repo: str, digest: str, branch: str = "main") -> list[str]:
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    return [commit.commit_id for commit in api.list_repo_commits(repo, revision=branch)
            if f"Request-Digest: {digest}" in commit.message]


def test_publish_is_one_commit_the_client_downloads_byte_for_byte(hub_env: FakeHub, merged: Path, base_on_hub: str,
                                                                 tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    lineage = lineage_of(merged, settings, "d" * 64)
    sent: list[int] = []

    published = publish(HubTarget(settings), "hf://pub/merged", merged, lineage, sent)

    sha = hub_env.resolve("pub/merged")
    assert published == Published(uri="hf://pub/merged", version=sha, url=f"{hub_env.endpoint}/pub/merged/tree/{sha}")
    assert hub_env.requests.count(kind="create_commit") == 1
    assert hub_env.requests.count(kind="create_repo") == 1
    assert hub_env.requests.count(kind="upload", server="cdn") > 3  # the shards went up in parts (multipart)
    folder = Path(snapshot_download("pub/merged", revision=sha, endpoint=hub_env.endpoint, token=hub_env.token,
                                    cache_dir=tmp_path / "hf-cache"))
    downloaded = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir()}
    assert {name: downloaded[name] for name in lineage.manifest_sha256} == lineage.manifest_sha256
    assert set(downloaded) == {*lineage.manifest_sha256, "README.md", LINEAGE_FILE, ".gitattributes"}
    assert Lineage.model_validate_json((folder / LINEAGE_FILE).read_text()) == lineage
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == BASE_REPO and card.data.base_model_relation == "merge"
    assert card.data.adapter_merge == lineage.tags()
    assert "support-bot" in card.text and lineage.request_digest in card.text
    assert sum(sent) == total_bytes(merged, lineage)
    assert len(sent) > len(lineage.manifest_sha256)  # as the bytes went, not a file at a time
    with pytest.raises(RepositoryNotFoundError):  # created private
        HfApi(endpoint=hub_env.endpoint, token=False).model_info("pub/merged")


def test_the_same_request_published_again_finds_its_commit(hub_env: FakeHub, merged: Path, base_on_hub: str,
                                                          tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    lineage = lineage_of(merged, settings, "e" * 64)
    first = publish(HubTarget(settings), "hf://pub/twice", merged, lineage)
    hub_env.commit("pub/twice", files={"NOTES.md": b"someone else's commit"})

    rerun = HubTarget(settings)  # a rerun of the job, in another worker
    assert rerun.find(PublishSpec(to="hf://pub/twice"), lineage) == first
    assert publish(rerun, "hf://pub/twice", merged, lineage) == first
    assert commits_with(hub_env, "pub/twice", lineage.request_digest) == [first.version]
    assert hub_env.requests.count(kind="create_commit") == 1
    other = lineage_of(merged, settings, "f" * 64, job_id="job-2")
    assert rerun.find(PublishSpec(to="hf://pub/twice"), other) is None


def test_a_publish_deep_in_the_history_is_found(hub_env: FakeHub, merged: Path, base_on_hub: str,
                                               tmp_path: Path) -> None:
    """Sixty commits later (the hub pages the history 50 at a time), the rerun still finds its commit; a publish
    near the head is found in the first page, the rest of the history never asked for."""
    settings = settings_for(tmp_path)
    lineage = lineage_of(merged, settings, "5" * 64)
    first = publish(HubTarget(settings), "hf://pub/deep", merged, lineage)
    for number in range(60):
        hub_env.commit("pub/deep", files={"NOTES.md": f"edit {number}".encode()})
    recent = lineage_of(merged, settings, "6" * 64, job_id="job-2")
    latest = publish(HubTarget(settings), "hf://pub/deep", merged, recent)
    hub_env.requests.clear()

    assert HubTarget(settings).find(PublishSpec(to="hf://pub/deep"), lineage) == first
    assert hub_env.requests.count(kind="commits") == 2
    hub_env.requests.clear()
    assert HubTarget(settings).find(PublishSpec(to="hf://pub/deep"), recent) == latest
    assert hub_env.requests.count(kind="commits") == 1


def test_a_commit_whose_answer_was_lost_is_found_not_repeated(hub_env: FakeHub, merged: Path, base_on_hub: str,
                                                              tmp_path: Path) -> None:
    """The hub commits, then the connection drops: the client cannot tell; the target looks, finds it, stops."""
    settings = settings_for(tmp_path)
    lineage = lineage_of(merged, settings, "a" * 64)
    hub_env.add_repo("pub/lost")
    hub_env.lose_commit_answer("pub/lost")
    sent: list[int] = []

    published = publish(HubTarget(settings), "hf://pub/lost", merged, lineage, sent)

    assert commits_with(hub_env, "pub/lost", lineage.request_digest) == [published.version]
    assert published.version == hub_env.resolve("pub/lost")
    assert hub_env.requests.count(kind="create_commit") == 1
    assert sum(sent) == total_bytes(merged, lineage)


def test_a_branch_that_moved_before_the_commit_is_read_again(hub_env: FakeHub, merged: Path, base_on_hub: str,
                                                             tmp_path: Path) -> None:
    """Someone commits between the target's read of the head and its commit: the hub refuses the stale parent
    (412), the target reads the new head and commits on it; files no longer part of the model are deleted."""
    settings = settings_for(tmp_path)
    lineage = lineage_of(merged, settings, "b" * 64)
    repo = "pub/moving"
    hub_env.add_repo(repo)
    hub_env.commit(repo, files={"old-model.safetensors": b"old weights"})
    theirs: list[str] = []
    hub_env.before("preupload", lambda: theirs.append(hub_env.commit(repo, files={"NOTES.md": b"theirs"})))
    sent: list[int] = []

    published = publish(HubTarget(settings), f"hf://{repo}", merged, lineage, sent)

    commits = HfApi(endpoint=hub_env.endpoint, token=hub_env.token).list_repo_commits(repo)
    assert [commit.commit_id for commit in commits[:2]] == [published.version, *theirs]
    refused = hub_env.requests.records(lambda record: record.kind == "create_commit")
    assert [record.status for record in refused] == [412, 200]
    tree = set(HfApi(endpoint=hub_env.endpoint, token=hub_env.token).list_repo_files(repo, revision=published.version))
    assert tree == {*lineage.manifest_sha256, "README.md", LINEAGE_FILE, ".gitattributes"}
    assert sum(sent) == total_bytes(merged, lineage)  # the second attempt's uploads are not counted twice


def test_a_branch_that_keeps_moving_fails_the_publish(hub_env: FakeHub, merged: Path, base_on_hub: str,
                                                      tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    lineage = lineage_of(merged, settings, "c" * 64)
    hub_env.add_repo("pub/busy")
    counter = iter(range(100))
    hub_env.before("preupload", lambda: hub_env.commit("pub/busy", files={"n.txt": str(next(counter)).encode()}),
                   times=100)

    problem = problem_of(lambda: publish(HubTarget(settings), "hf://pub/busy", merged, lineage))

    assert problem.kind is Problems.PUBLISH_FAILED and problem.members["field"] == "publish.to"
    assert "hf://pub/busy" in problem.detail and "moved" in problem.detail
    assert commits_with(hub_env, "pub/busy", lineage.request_digest) == []


def test_a_cancel_mid_upload_stops_it_and_commits_nothing(hub_env: FakeHub, tiny_models: TinyModels,
                                                          base_on_hub: str, tmp_path: Path) -> None:
    """The runner's byte counter raises once the job is cancelled: the upload stops there, the exception comes
    through as itself (not as a hub error), and the branch is as it was. (A merge of its own: the hub would not
    ask again for weights it has from another test.)"""
    settings = settings_for(tmp_path)
    merged = merge_tiny(tiny_models, 0.125, tmp_path / "merged")
    lineage = lineage_of(merged, settings, "4" * 64)
    main = hub_env.add_repo("pub/cancelled")
    sent: list[int] = []

    def counter(count: int) -> None:
        sent.append(count)
        if sum(sent) > 1 << 20:
            raise MergeCancelled("cancelled")

    with pytest.raises(MergeCancelled):
        HubTarget(settings).publish(PublishSpec(to="hf://pub/cancelled"), merged, lineage, counter)
    assert hub_env.requests.count(kind="create_commit") == 0 and hub_env.resolve("pub/cancelled") == main
    assert sum(sent) < total_bytes(merged, lineage)


def test_a_new_branch_is_created_from_main(hub_env: FakeHub, merged: Path, base_on_hub: str, tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    lineage = lineage_of(merged, settings, "1" * 64)
    main = hub_env.add_repo("pub/branches")

    published = publish(HubTarget(settings), "hf://pub/branches@release%2Fv1", merged, lineage)

    assert hub_env.resolve("pub/branches", "release/v1") == published.version
    assert hub_env.resolve("pub/branches", "main") == main
    assert commits_with(hub_env, "pub/branches", lineage.request_digest, "release/v1") == [published.version]


def test_an_unreachable_or_stalled_hub_is_a_503(merged: Path, base_on_hub: str, hub: FakeHub, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(tmp_path, download_timeout_seconds=1.0)
    use_hub(monkeypatch, hub.endpoint, hub.token)
    lineage = lineage_of(merged, settings, "2" * 64)
    use_hub(monkeypatch, closed_endpoint(), hub.token)

    problem = problem_of(lambda: publish(HubTarget(settings), "hf://pub/down", merged, lineage))
    assert problem.kind is Problems.REGISTRY_UNAVAILABLE and problem.retry_after
    assert problem.members["field"] == "publish.to" and "hf://pub/down" in problem.detail

    use_hub(monkeypatch, hub.endpoint, hub.token)
    hub.add_repo("pub/stalled")
    hub.stall("pub/stalled")
    problem = problem_of(lambda: publish(HubTarget(settings), "hf://pub/stalled", merged, lineage))
    assert problem.kind is Problems.REGISTRY_UNAVAILABLE and "no answer in time" in problem.detail


def test_a_hub_that_refuses_is_a_502_naming_the_repo(hub: FakeHub, merged: Path, base_on_hub: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(tmp_path)
    use_hub(monkeypatch, hub.endpoint, hub.token)
    lineage = lineage_of(merged, settings, "3" * 64)
    use_hub(monkeypatch, hub.endpoint, None)  # no token: the hub lets nobody write

    problem = problem_of(lambda: publish(HubTarget(settings), "hf://pub/refused", merged, lineage))

    assert problem.kind is Problems.PUBLISH_FAILED and problem.status == 502
    assert problem.detail.startswith("publish.to: 'hf://pub/refused'") and "token" in problem.detail
    assert hub.store.repo("pub/refused") is None


@pytest.mark.parametrize(("to", "why"), [
    ("hf://pub/name/folder", "folder"),
    ("hf://datasets/pub/name", "dataset"),
    ("hf://pub/name@refs/pr/1", "not a branch"),
    ("hf://pub/name@" + "0" * 40, "not a branch"),
    ("hf://name", "hf://ORG/NAME[@BRANCH]"),
])
def test_check_refuses_what_cannot_be_a_branch_of_a_model_repo(to: str, why: str, tmp_path: Path) -> None:
    problem = problem_of(lambda: HubTarget(settings_for(tmp_path)).check(PublishSpec(to=to), "publish.to"))
    assert problem.kind is Problems.REFERENCE_INVALID and problem.members["field"] == "publish.to"
    assert why in problem.detail


def test_check_refuses_an_alias(tmp_path: Path) -> None:
    spec = PublishSpec(to="hf://pub/name", alias="champion")
    problem = problem_of(lambda: HubTarget(settings_for(tmp_path)).check(spec, "publish.to"))
    assert problem.members["field"] == "publish.alias"


def test_the_fake_hub_refuses_a_stale_parent_as_the_hub_does(hub: FakeHub) -> None:
    """What the client raises on a parent that is no longer the head: HTTP 412 with the hub's message."""
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    api.create_repo("pub/stale")
    head = api.model_info("pub/stale").sha
    hub.commit("pub/stale", files={"a.txt": b"first"})

    with pytest.raises(HfHubHTTPError) as caught:
        api.create_commit("pub/stale", [CommitOperationAdd("b.txt", b"b")], commit_message="b", parent_commit=head)
    assert caught.value.response.status_code == 412
    assert "A commit has happened since" in str(caught.value)
    assert json.loads(caught.value.response.text) == {"error": "A commit has happened since. Please refresh and "
                                                                "try again."}



def test_the_fake_hub_checks_a_commit_as_the_hub_does(hub: FakeHub) -> None:
    """A branch that exists, a file to delete that does not, card metadata the model tree cannot use, and an LFS
    pointer to an object never uploaded: each refused, and the client raises what it raises for the hub."""
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    api.create_repo("pub/checks")
    head = hub.resolve("pub/checks")
    with pytest.raises(HfHubHTTPError) as exists:
        api.create_branch("pub/checks", branch="main")
    assert exists.value.response.status_code == 409
    with pytest.raises(RemoteEntryNotFoundError):
        api.create_commit("pub/checks", [CommitOperationDelete("missing.txt")], commit_message="delete")
    with pytest.raises(ValueError, match=r"Invalid metadata in README\.md"):
        api.create_commit("pub/checks", [CommitOperationAdd("README.md", b"---\nbase_model_relation: merge\n---\n")],
                          commit_message="card")
    pointer = {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": "0" * 64, "size": 1}}
    lines = [{"key": "header", "value": {"summary": "s", "description": ""}}, pointer]
    answer = httpx.post(f"{hub.endpoint}/api/models/pub/checks/commit/main", headers={
        "Authorization": f"Bearer {hub.token}", "Content-Type": "application/x-ndjson"},
        content=b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    assert answer.status_code == 400 and "never uploaded" in answer.json()["error"]
    assert hub.resolve("pub/checks") == head


# -- through the service -----------------------------------------------------------------------------------------

SERVICE_BASE = "pub/service-base"


@pytest.fixture(scope="module")
def service_base(hub_server: FakeHub, models: Models) -> str:
    """The base the services merge, from the hub (so the card names it as `base_model`)."""
    hub_server.add_repo(SERVICE_BASE, models.root / "base")
    return f"hf://{SERVICE_BASE}"


@pytest.fixture(scope="module")
def service(models: Models, hub_server: FakeHub, service_base: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with embedded(models, tmp_path_factory.mktemp("publish-hub"), publish_env(hub_server.env, "hf://pub/*")) as running:
        yield running


@pytest.fixture(scope="module")
def distributed(models: Models, hub_server: FakeHub, service_base: str, redis_namespace: dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    env = publish_env(hub_server.env, "hf://pub/*", pace=PACE)
    with cluster(models, tmp_path_factory.mktemp("publish-hub-cluster"), env, redis_namespace) as running:
        yield running


def assert_on_hub(hub: FakeHub, job: dict[str, Any], repo: str, tmp_path: Path) -> None:
    """The job's publish is the branch's commit: every file with the job's sha256, its lineage and its card."""
    sha = hub.resolve(repo)
    assert job["published"] == {"uri": f"hf://{repo}", "version": sha, "url": f"{hub.endpoint}/{repo}/tree/{sha}"}
    folder = Path(snapshot_download(repo, revision=sha, endpoint=hub.endpoint, token=hub.token,
                                    cache_dir=tmp_path / "hf-cache"))
    digests = artifact_digests(job)
    assert {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in digests} == digests
    assert_lineage(json.loads((folder / LINEAGE_FILE).read_text()), job)
    card = ModelCard.load(folder / "README.md")
    assert (card.data.base_model, card.data.base_model_relation) == (SERVICE_BASE, "merge")
    assert card.data.adapter_merge["request_digest"] == digest_of(job)


def test_a_job_publishes_one_commit_and_an_identical_one_finds_it(service: Deployment, hub: FakeHub,
                                                                  service_base: str, tmp_path: Path) -> None:
    repo = unique("pub/service")
    api = service.api
    job = finished(api, api.submit(merge_request(f"hf://{repo}", base_model=service_base))["id"])
    assert_on_hub(hub, job, repo, tmp_path)
    assert_published_progress(job)

    again = finished(api, api.submit(merge_request(f"hf://{repo}", base_model=service_base, reuse=False))["id"])
    assert again["request_digest"] == job["request_digest"] and again["published"] == job["published"]
    assert commits_with(hub, repo, digest_of(job)) == [job["published"]["version"]]


def test_a_worker_killed_mid_upload_ends_with_one_commit(distributed: Cluster, hub: FakeHub, service_base: str,
                                                         tmp_path: Path) -> None:
    repo = unique("pub/killed")
    job_id = distributed.api.submit(merge_request(f"hf://{repo}", base_model=service_base, weight=0.25))["id"]
    distributed.api.wait(job_id, lambda job: job["progress"]["phase"] == "publishing"
                         and 0 < job["progress"]["bytes_done"] < job["progress"]["bytes_total"], timeout=60)
    distributed.kill_worker()
    assert hub.requests.count(kind="create_commit") == 0

    distributed.start_worker()
    job = finished(distributed.api, job_id)
    assert job["attempts"] == 2
    assert_on_hub(hub, job, repo, tmp_path)
    assert commits_with(hub, repo, digest_of(job)) == [job["published"]["version"]]
