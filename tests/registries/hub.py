"""`FakeHub`: a Hugging Face hub on 127.0.0.1 for tests, in one object.

    hub = FakeHub(tmp_path).start()
    sha = hub.add_repo("org/base", folder)                 # first commit on main
    HfApi(endpoint=hub.endpoint).model_info("org/base", files_metadata=True).sha == sha
    hub.commit("org/base", files={"README.md": b"v2"})     # main moves; `sha` still serves the old tree
    hub.downloads("org/base", "model.safetensors")         # full GETs of that file's bytes so far
    hub.stall("org/base", "model.safetensors"); ...; hub.heal()
    HfApi(endpoint=hub.endpoint, token=hub.token).create_commit("org/out", ...)   # the write side: `hub_write`
    hub.stop()

Everything is served from two listeners (the hub and its LFS "CDN", see `hub_http`), each a thread per
connection; the requests both saw are in `hub.requests`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType

from tests.registries.hub_faults import Fault, FaultKind, Faults
from tests.registries.hub_http import HubContext, HubHTTPServer
from tests.registries.hub_repos import HubFile, RepoStore
from tests.registries.request_log import RequestLog

DEFAULT_TOKEN = "hf_registrytests0000000000000000000"


class FakeHub:
    """Repos, branches and faults of a hub served on loopback; see the module's docstring."""

    def __init__(self, root: Path, *, tokens: Iterable[str] = (DEFAULT_TOKEN,), tree_page_size: int = 1000) -> None:
        tokens = tuple(tokens)
        self.token = tokens[0] if tokens else None
        """A token that reads every private repo (any of `tokens` does)."""
        self.store = RepoStore(root)
        self.requests = RequestLog()
        self.faults = Faults()
        self._context = HubContext(self.store, self.requests, self.faults, frozenset(tokens), tree_page_size)
        self._servers: list[tuple[HubHTTPServer, threading.Thread]] = []

    # -- life cycle ---------------------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        for role in ("hub", "cdn"):
            server = HubHTTPServer(self._context, role)
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"fake-{role}",
                                      daemon=True)
            thread.start()
            self._servers.append((server, thread))
        self._context.endpoint = self._servers[0][0].url
        self._context.cdn_endpoint = self._servers[1][0].url
        return self

    def stop(self) -> None:
        self.faults.heal()
        for server, thread in self._servers:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        self._servers.clear()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """For `HfApi(endpoint=...)`, `hf_hub_download(..., endpoint=...)` or HF_ENDPOINT."""
        return self._context.endpoint

    @property
    def cdn_endpoint(self) -> str:
        """Where LFS files are served from (resolve redirects there)."""
        return self._context.cdn_endpoint

    @property
    def env(self) -> dict[str, str]:
        """Environment for a process that should use this hub: HF_ENDPOINT, HF_TOKEN (drop it to go without)
        and telemetry off. HF_ENDPOINT is read when huggingface_hub is imported: in this process, pass
        `endpoint=` (HfApi, hf_hub_download, snapshot_download) instead."""
        env = {"HF_ENDPOINT": self.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
        if self.token:
            env["HF_TOKEN"] = self.token
        return env

    # -- repos --------------------------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, folder: Path | None = None, *, private: bool = False,
                 branch: str = "main", message: str = "Initial commit") -> str:
        """Create repo `ORG/NAME` with `folder`'s files as the first commit on `branch`; return its sha."""
        self.store.create_repo(repo_id, private=private)
        return self.store.commit(repo_id, folder, files={} if folder else {".gitattributes": b""},
                                 branch=branch, message=message)

    def commit(self, repo_id: str, folder: Path | None = None, *, files: Mapping[str, bytes | Path] | None = None,
               delete: Iterable[str] = (), branch: str = "main", message: str = "Update") -> str:
        """A new commit on `branch` (see `RepoStore.commit`), which moves there; return its sha."""
        return self.store.commit(repo_id, folder, files=files, delete=delete, branch=branch, message=message)

    def set_branch(self, repo_id: str, branch: str, revision: str) -> str:
        """Point `branch` (created if missing) at the commit `revision` names now; return its sha."""
        return self.store.set_ref(repo_id, branch, revision)

    def tag(self, repo_id: str, tag: str, revision: str = "main") -> str:
        return self.store.set_ref(repo_id, tag, revision, tag=True)

    def resolve(self, repo_id: str, revision: str = "main") -> str:
        """The commit sha `revision` names now."""
        return self.store.commit_of(repo_id, revision).sha

    def file(self, repo_id: str, path: str, revision: str = "main") -> HubFile:
        """A file as committed: size, sha256, blob_id, lfs, and where its bytes are."""
        return self.store.commit_of(repo_id, revision).files[path]

    # -- counting -----------------------------------------------------------------------------------------------

    def downloads(self, repo_id: str, path: str) -> int:
        """Whole-file GETs answered with the bytes of `path` (for LFS files: by the CDN)."""
        return self.requests.count(method="GET", key=f"{repo_id}/{path}", statuses=(200,), ranged=False)

    def ranged_reads(self, repo_id: str, path: str) -> int:
        """GETs answered with part of `path` (206)."""
        return self.requests.count(method="GET", key=f"{repo_id}/{path}", statuses=(206,))

    # -- faults -------------------------------------------------------------------------------------------------

    def stall(self, repo_id: str, path: str | None = None) -> None:
        """Accept and never answer (until `heal()`): GETs of `path`'s bytes, or with no path every request about
        the repo (API, resolve, CDN)."""
        self.faults.set(repo_id, path, Fault(FaultKind.STALL))

    def trickle(self, repo_id: str, path: str, bytes_per_second: int = 1024) -> None:
        """Answer GETs of `path` at once, then send the body at `bytes_per_second` (until `heal()`)."""
        self.faults.set(repo_id, path, Fault(FaultKind.TRICKLE, bytes_per_second))

    def corrupt(self, repo_id: str, path: str) -> None:
        """Serve `path` with its middle byte inverted: right size and headers, wrong sha256."""
        self.faults.set(repo_id, path, Fault(FaultKind.CORRUPT))

    def lose_commit_answer(self, repo_id: str) -> None:
        """Make the next commit to the repo, then close its connection without an answer (until `heal()`): a
        client that cannot tell whether it committed."""
        self.faults.lose_commit_answer(repo_id)

    def before(self, kind: str, action: Callable[[], object], *, times: int = 1) -> None:
        """Run `action` in the server before each of the next `times` requests of `kind` ("preupload",
        "create_commit", ... as in `hub.requests`) is handled (until `heal()`): another writer getting in between."""
        self.faults.before(kind, action, times)

    def heal(self) -> None:
        """End every fault; stalled requests are then dropped without an answer."""
        self.faults.heal()
