"""The fake hub speaks the protocol huggingface_hub 2.x uses: proved with the real client (HfApi, hf_hub_download,
snapshot_download), and with plain HTTP where the service will use it (ranged reads of safetensors headers).

Every call names the endpoint (HF_ENDPOINT is read at import); `token=False` means "send no token", whatever the
environment holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import httpx2
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import safe_open

from tests.registries.fixtures import TinyModels
from tests.registries.hub import FakeHub

SHARD = "model-00001-of-00003.safetensors"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def base_repo(hub_server: FakeHub, tiny_models: TinyModels) -> tuple[str, str]:
    """("org/base", its first commit), public."""
    return "org/base", hub_server.add_repo("org/base", tiny_models.base)


@pytest.fixture(scope="module")
def private_repo(hub_server: FakeHub, tiny_models: TinyModels) -> tuple[str, str]:
    return "org/private-lora", hub_server.add_repo("org/private-lora", tiny_models.adapter, private=True)


def test_model_info_pins_the_commit_and_describes_every_file(hub: FakeHub, tiny_models: TinyModels,
                                                              base_repo: tuple[str, str]) -> None:
    repo, sha = base_repo
    info = HfApi(endpoint=hub.endpoint, token=False).model_info(repo, revision="main", files_metadata=True)
    assert info.sha == sha == hub.resolve(repo, "main")
    local = files_of(tiny_models.base)
    assert {sibling.rfilename for sibling in info.siblings} == set(local)
    for sibling in info.siblings:
        data = local[sibling.rfilename]
        assert sibling.size == len(data)
        if sibling.rfilename.endswith(".safetensors"):
            assert sibling.lfs is not None and sibling.lfs.sha256 == hashlib.sha256(data).hexdigest()
            assert sibling.lfs.size == len(data)
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sibling.lfs.sha256}\nsize {len(data)}\n"
            assert sibling.blob_id == git_blob_sha1(pointer.encode())
        else:
            assert sibling.lfs is None and sibling.blob_id == git_blob_sha1(data)
    # Without files_metadata: names only, as on the hub.
    bare = HfApi(endpoint=hub.endpoint, token=False).model_info(repo)
    assert bare.sha == sha and all(sibling.size is None for sibling in bare.siblings)
    assert [record.path for record in hub.requests] == [f"/api/models/{repo}/revision/main", f"/api/models/{repo}"]


def test_hf_hub_download_small_and_lfs_files_through_the_cdn(hub: FakeHub, tiny_models: TinyModels,
                                                             base_repo: tuple[str, str], tmp_path: Path) -> None:
    repo, sha = base_repo
    for name in ("config.json", SHARD):
        path = Path(hf_hub_download(repo, name, endpoint=hub.endpoint, cache_dir=tmp_path, token=False))
        assert path.read_bytes() == (tiny_models.base / name).read_bytes()
        assert path.parent.name == sha  # snapshots/<commit>/<file>
    head = hub.requests.records(lambda r: r.method == "HEAD" and r.key == f"{repo}/{SHARD}")
    assert [r.status for r in head] == [302]  # metadata from the redirect itself: the client stops there
    assert hub.downloads(repo, "config.json") == 1 and hub.downloads(repo, SHARD) == 1
    assert hub.requests.count(server="cdn", method="GET", statuses=(200,)) == 1
    # Asked again, by commit: served from the cache, no request at all.
    hub.requests.clear()
    again = hf_hub_download(repo, SHARD, revision=sha, endpoint=hub.endpoint, cache_dir=tmp_path, token=False)
    assert Path(again).read_bytes() == (tiny_models.base / SHARD).read_bytes()
    assert len(hub.requests) == 0


def test_snapshot_download_lists_the_tree_and_fetches_every_file(hub: FakeHub, tiny_models: TinyModels,
                                                                 base_repo: tuple[str, str], tmp_path: Path) -> None:
    repo, sha = base_repo
    folder = Path(snapshot_download(repo, endpoint=hub.endpoint, cache_dir=tmp_path, token=False))
    assert folder.name == sha
    assert files_of(folder) == files_of(tiny_models.base)
    assert hub.requests.count(kind="model_info") == 1
    assert hub.requests.count(kind="tree") == 1
    assert all(hub.downloads(repo, name) == 1 for name in files_of(tiny_models.base))


def test_tree_listing_pages_and_paths_info(tmp_path: Path, tiny_models: TinyModels) -> None:
    """The hub pages /tree with a Link header (1000 entries a page); the client follows it."""
    with FakeHub(tmp_path / "hub", tree_page_size=2) as paged:
        paged.add_repo("org/nested")  # a first commit of an empty .gitattributes, as on the hub
        sha = paged.commit("org/nested", files={"a/b/c.json": b"{}", "a/d.safetensors": b"x" * 10, "e.txt": b"e"})
        api = HfApi(endpoint=paged.endpoint, token=False)
        entries = {entry.path: entry for entry in api.list_repo_tree("org/nested", recursive=True, revision=sha)}
        assert set(entries) == {".gitattributes", "a", "a/b", "a/b/c.json", "a/d.safetensors", "e.txt"}
        assert paged.requests.count(kind="tree") == 3  # six entries, two a page
        assert entries["a/d.safetensors"].lfs.sha256 == hashlib.sha256(b"x" * 10).hexdigest()
        top = [entry.path for entry in api.list_repo_tree("org/nested", path_in_repo="a", revision="main")]
        assert top == ["a/b", "a/d.safetensors"]
        info = api.get_paths_info("org/nested", ["e.txt", "a", "missing"], revision=sha)
        assert sorted((entry.path, type(entry).__name__) for entry in info) == [("a", "RepoFolder"),
                                                                                 ("e.txt", "RepoFile")]


def test_ranged_get_reads_a_safetensors_header(hub: FakeHub, tiny_models: TinyModels,
                                               base_repo: tuple[str, str]) -> None:
    """What the service does at submit time: 8 bytes of header length, then the header, through resolve."""
    repo, sha = base_repo
    url = f"{hub.endpoint}/{repo}/resolve/{sha}/{SHARD}"
    with httpx.Client(follow_redirects=True, timeout=10) as client:
        first = client.get(url, headers={"Range": "bytes=0-7"})
        assert first.status_code == 206 and first.content == (tiny_models.base / SHARD).read_bytes()[:8]
        size = (tiny_models.base / SHARD).stat().st_size
        assert first.headers["Content-Range"] == f"bytes 0-7/{size}"
        (length,) = struct.unpack("<Q", first.content)
        header = json.loads(client.get(url, headers={"Range": f"bytes=8-{7 + length}"}).content)
        assert client.get(url, headers={"Range": f"bytes={size}-"}).status_code == 416
        small = client.get(f"{hub.endpoint}/{repo}/resolve/{sha}/config.json", headers={"Range": "bytes=0-0"})
        assert (small.status_code, small.content) == (206, b"{")  # small files: ranges on the hub itself
    with safe_open(tiny_models.base / SHARD, "pt") as local:
        assert set(header) - {"__metadata__"} == set(local.keys())
    assert hub.ranged_reads(repo, SHARD) == 2 and hub.downloads(repo, SHARD) == 0
    # The client's own parser reads the same way (bytes=0-100000 through the redirect).
    parsed = HfApi(endpoint=hub.endpoint, token=False).parse_safetensors_file_metadata(repo, SHARD, revision=sha)
    assert set(parsed.tensors) == set(header) - {"__metadata__"}


def test_a_pinned_commit_does_not_move_with_its_branch(hub: FakeHub, tiny_models: TinyModels,
                                                       tmp_path: Path) -> None:
    repo = "org/moving"
    first = hub.add_repo(repo, tiny_models.adapter)
    hub.tag(repo, "v1", first)
    second = hub.commit(repo, files={"adapter_config.json": b'{"r": 16}'})
    api = HfApi(endpoint=hub.endpoint, token=False)
    assert api.model_info(repo).sha == second and api.model_info(repo, revision="v1").sha == first
    old = hf_hub_download(repo, "adapter_config.json", revision=first, endpoint=hub.endpoint, cache_dir=tmp_path,
                          token=False)
    assert Path(old).read_bytes() == (tiny_models.adapter / "adapter_config.json").read_bytes()
    new = hf_hub_download(repo, "adapter_config.json", endpoint=hub.endpoint, cache_dir=tmp_path, token=False)
    assert Path(new).read_bytes() == b'{"r": 16}'
    # Branch names may hold slashes (the client sends them percent-encoded) and move back and forth.
    hub.set_branch(repo, "release/2025", first)
    assert api.model_info(repo, revision="release/2025").sha == first
    refs = api.list_repo_refs(repo)
    assert {(ref.name, ref.target_commit) for ref in refs.branches} == {("main", second), ("release/2025", first)}
    assert [(ref.ref, ref.target_commit) for ref in refs.tags] == [("refs/tags/v1", first)]
    assert hub.set_branch(repo, "main", first) == first and api.model_info(repo).sha == first


def test_missing_repo_revision_and_file_map_to_the_clients_errors(hub: FakeHub, base_repo: tuple[str, str],
                                                                  tmp_path: Path) -> None:
    repo, _ = base_repo
    api = HfApi(endpoint=hub.endpoint, token=False)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/nope")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/nope", "config.json", endpoint=hub.endpoint, cache_dir=tmp_path, token=False)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo, "config.json", revision="0" * 40, endpoint=hub.endpoint, cache_dir=tmp_path,
                        token=False)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "no-such-file.json", endpoint=hub.endpoint, cache_dir=tmp_path, token=False)
    assert not api.file_exists(repo, "no-such-file.json") and api.file_exists(repo, "config.json")
    assert {record.status for record in hub.requests if record.key == "org/nope"} == {401}


def test_a_private_repo_needs_the_token_which_never_reaches_the_cdn(hub: FakeHub, tiny_models: TinyModels,
                                                                    private_repo: tuple[str, str],
                                                                    tmp_path: Path) -> None:
    repo, sha = private_repo
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).model_info(repo)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo, "adapter_model.safetensors", endpoint=hub.endpoint, cache_dir=tmp_path, token=False)
    with pytest.raises(HfHubHTTPError) as wrong:
        HfApi(endpoint=hub.endpoint, token="hf_wrong").model_info(repo)
    assert wrong.value.response.status_code == 401 and not isinstance(wrong.value, RepositoryNotFoundError)
    with pytest.raises(RepositoryNotFoundError):  # a valid token, a repo that does not exist: 404
        HfApi(endpoint=hub.endpoint, token=hub.token).model_info("org/nope")

    hub.requests.clear()
    assert HfApi(endpoint=hub.endpoint, token=hub.token).model_info(repo).sha == sha
    path = hf_hub_download(repo, "adapter_model.safetensors", endpoint=hub.endpoint, cache_dir=tmp_path,
                           token=hub.token)
    assert Path(path).read_bytes() == (tiny_models.adapter / "adapter_model.safetensors").read_bytes()
    assert all(record.authorization for record in hub.requests if record.server == "hub")
    cdn = hub.requests.records(lambda record: record.server == "cdn")
    assert len(cdn) == 1 and not cdn[0].authorization


def test_a_stalled_file_holds_the_request_until_healed(hub: FakeHub, base_repo: tuple[str, str]) -> None:
    repo, sha = base_repo
    hub.stall(repo, SHARD)
    api = HfApi(endpoint=hub.endpoint, token=False)
    assert api.get_hf_file_metadata(url=api_url(hub, repo, sha)).size > 0  # metadata still answers
    with pytest.raises(httpx.ReadTimeout), httpx.Client(follow_redirects=True) as client:
        client.get(api_url(hub, repo, sha), timeout=httpx.Timeout(5, read=0.5))
    stalled = hub.requests.records(lambda record: record.server == "cdn")
    assert len(stalled) == 1 and stalled[0].status is None
    hub.heal()
    with httpx.Client(follow_redirects=True) as client:
        assert client.get(api_url(hub, repo, sha), timeout=5).status_code == 200


def test_a_whole_stalled_repo_times_out_the_metadata_call(hub: FakeHub, base_repo: tuple[str, str]) -> None:
    """huggingface_hub 2.x raises its transport's (httpx2's) timeout, not an HfHubHTTPError."""
    repo, _ = base_repo
    hub.stall(repo)
    started = time.monotonic()
    with pytest.raises(httpx2.TimeoutException):
        HfApi(endpoint=hub.endpoint, token=False).model_info(repo, timeout=0.5)
    assert time.monotonic() - started < 5


def test_trickle_defeats_a_read_timeout_but_not_a_deadline(hub: FakeHub, tiny_models: TinyModels,
                                                          base_repo: tuple[str, str]) -> None:
    repo, sha = base_repo
    hub.trickle(repo, SHARD, bytes_per_second=20_000)
    received, started = b"", time.monotonic()
    with httpx.Client(follow_redirects=True) as client, client.stream(
            "GET", api_url(hub, repo, sha), timeout=httpx.Timeout(5, read=0.5)) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            received += chunk
            if time.monotonic() - started > 1.0:
                break
    assert 0 < len(received) < 60_000 < (tiny_models.base / SHARD).stat().st_size
    assert received == (tiny_models.base / SHARD).read_bytes()[:len(received)]


def test_corrupt_bytes_pass_the_client_and_fail_a_checksum(hub: FakeHub, tiny_models: TinyModels,
                                                           base_repo: tuple[str, str], tmp_path: Path) -> None:
    """The client does not re-hash what it downloads: only a check against lfs.sha256 finds the damage."""
    repo, sha = base_repo
    hub.corrupt(repo, SHARD)
    path = Path(hf_hub_download(repo, SHARD, revision=sha, endpoint=hub.endpoint, cache_dir=tmp_path, token=False))
    expected = hub.file(repo, SHARD, sha)
    assert path.stat().st_size == expected.size
    assert sha256_of(path) != expected.sha256 == sha256_of(tiny_models.base / SHARD)


def api_url(hub: FakeHub, repo: str, revision: str, name: str = SHARD) -> str:
    return f"{hub.endpoint}/{repo}/resolve/{revision}/{name}"


def test_the_env_is_all_a_process_needs(hub: FakeHub, private_repo: tuple[str, str], tmp_path: Path) -> None:
    """A fresh process with only `hub.env` (HF_ENDPOINT read at import, HF_TOKEN) reads the private repo."""
    repo, sha = private_repo
    script = "import sys; from huggingface_hub import HfApi; print(HfApi().model_info(sys.argv[1]).sha)"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **hub.env}
    out = subprocess.run([sys.executable, "-c", script, repo], env=env, capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.strip() == sha
    assert [(record.kind, record.authorization) for record in hub.requests] == [("model_info", True)]
