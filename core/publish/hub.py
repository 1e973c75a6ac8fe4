"""Publishing to a Hugging Face hub repo, `hf://ORG/NAME[@BRANCH]` (default branch main): one commit per publish.

The commit holds the merged folder's files (shards, index, config, side files, the manifest), the whole lineage
(`merge_lineage.json`) and a model card, README.md, whose metadata gives the hub's model tree (`base_model`, the
base's repo when it came from the hub, and `base_model_relation: merge`) and the lineage's tags; a README.md the
base brought along is replaced by it. Files the branch held that the merged folder lacks are deleted in the same
commit, so the branch then holds exactly this model (its history keeps the rest).

Exactly one commit per request digest. The commit's message carries `Request-Digest: <digest>` and `find` looks
for it in the branch's history. The commit names the head it was built on (`parent_commit`): if the branch moved
in between (someone committed, or an earlier attempt of this job whose answer was lost did), the hub refuses it
with 412, and the publish looks for its own commit again and retries on the new head, a bounded number of times. A
worker that dies mid-publish leaves either nothing anyone sees (uploaded LFS objects are invisible until a commit
names them) or the complete commit, which its rerun finds.

The repo is created if missing, private (making a model public is a person's decision on the hub), and so is the
branch, from main. Files go to the client as open file objects, so it uploads them through the hub's LFS API
over HTTP (basic or multipart, as the hub chooses; not Xet, which the client uses for paths and bytes), and its
reads count as progress. Client configuration is the hub sources' (`HF_ENDPOINT`, `HF_TOKEN`: see
`core/sources/hub.py`).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import httpx2
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCardData,
    constants,
    get_session,
    parse_hf_uri,
)
from huggingface_hub.errors import HfHubHTTPError, HfUriError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import ModelInfo
from huggingface_hub.utils import build_hf_headers, paginate

from adapter_merge.core.jobs import Published
from adapter_merge.core.problems import Problem, Problems
from adapter_merge.core.publish.base import ALIAS_FIELD, LINEAGE_FILE, TO_FIELD, ByteCounter, Lineage
from adapter_merge.core.refs import BadReference
from adapter_merge.core.request import PublishSpec
from adapter_merge.core.settings import Settings
from adapter_merge.core.sources.base import RegistryUnavailable
from adapter_merge.core.sources.hub import DEFAULT_REVISION, HUB_ERRORS, http_status, reason, transient
from adapter_merge.core.sources.transfer import retrying

CARD = "README.md"
KEPT = frozenset({".gitattributes"})
"""Files of the branch a publish never deletes (the repo's LFS rules)."""
DIGEST_TRAILER = "Request-Digest"
COMMIT_ATTEMPTS = 4
"""Commits tried on a branch that keeps moving (or a hub that keeps failing) before the publish fails."""
STALE_PARENT = 412
T = TypeVar("T")


class HubTarget:
    scheme = "hf"

    def __init__(self, settings: Settings) -> None:
        self.endpoint = constants.ENDPOINT
        self.api = HfApi(endpoint=self.endpoint)
        self.timeout = settings.download_timeout_seconds
        self.retries = settings.download_retries
        self.threads = settings.publish_threads

    def check(self, spec: PublishSpec, field: str) -> None:
        parse(spec.to, field)
        if spec.alias is not None:
            raise BadReference(ALIAS_FIELD, spec.alias, Problems.REFERENCE_INVALID, "applies to models:/ targets "
                               "only")

    def find(self, spec: PublishSpec, lineage: Lineage) -> Published | None:
        """The branch's commit whose message carries this request digest, if there is one."""
        repo, branch = parse(spec.to, TO_FIELD)
        with _problems(spec):
            try:  # one quick request first: no repo or branch, or no hub, is told without paging any history
                self._call(lambda: self.api.model_info(repo, revision=branch, timeout=self.timeout))
            except (RepositoryNotFoundError, RevisionNotFoundError):
                return None
            return self._find_in_history(spec, repo, branch, lineage)

    def publish(self, spec: PublishSpec, folder: Path, lineage: Lineage, progress: ByteCounter) -> Published:
        repo, branch = parse(spec.to, TO_FIELD)
        sent = _Tally(progress, sum((folder / path).stat().st_size for path in _merged_files(lineage)))
        readers: list[_CountedReader] = []
        refused: Exception | None = None
        try:
            with _problems(spec, readers):
                for _ in range(COMMIT_ATTEMPTS):
                    head, paths = self._head(repo, branch)
                    found = self._find_in_history(spec, repo, branch, lineage)
                    if found is not None:
                        sent.rest()
                        return found
                    _reopen(readers, folder, lineage, sent)
                    operations = [*_additions(readers, folder, lineage, spec), *_card_and_lineage(lineage),
                                  *_deletions(paths, lineage)]
                    self._bound_session()
                    try:
                        info = self.api.create_commit(repo, operations, commit_message=_title(lineage),
                                                      commit_description=_description(lineage), revision=branch,
                                                      parent_commit=head, num_threads=self.threads)
                    except HUB_ERRORS as error:
                        if not (transient(error) or _stale(error)):
                            raise
                        refused = error  # the branch moved, or the hub failed (perhaps after committing): look again
                        continue
                    sent.rest()  # what the hub had already was never read
                    return self._published(spec, repo, info.oid)
        finally:
            for reader in readers:
                reader.close()
        if refused is not None and transient(refused):
            raise RegistryUnavailable(TO_FIELD, spec.to, reason(refused))
        raise Problem(Problems.PUBLISH_FAILED, f"{TO_FIELD}: {spec.to!r} could not be published: the branch moved "
                      f"before each of {COMMIT_ATTEMPTS} commits (someone else keeps committing to it)",
                      field=TO_FIELD, ref=spec.to)

    # -- the branch ---------------------------------------------------------------------------------------------

    def _head(self, repo: str, branch: str) -> tuple[str, set[str]]:
        """The branch's head commit and the files it holds; the repo (private) and the branch are created first
        when missing."""
        def info() -> ModelInfo:
            return self._call(lambda: self.api.model_info(repo, revision=branch, timeout=self.timeout))

        try:
            head = info()
        except RepositoryNotFoundError:
            self._call(lambda: self.api.create_repo(repo, private=True, exist_ok=True))
            head = self._branch(repo, branch, info)
        except RevisionNotFoundError:
            head = self._branch(repo, branch, info)
        return str(head.sha), {sibling.rfilename for sibling in head.siblings or []}

    def _branch(self, repo: str, branch: str, info: Callable[[], ModelInfo]) -> ModelInfo:
        """The branch's head, the branch created from main if missing (a new repo has main only)."""
        try:
            return info()
        except RevisionNotFoundError:
            if branch == DEFAULT_REVISION:
                raise
        self._call(lambda: self.api.create_branch(repo, branch=branch, exist_ok=True))
        return info()

    def _find_in_history(self, spec: PublishSpec, repo: str, branch: str, lineage: Lineage) -> Published | None:
        """The newest commit of the branch whose message has this request's digest trailer.

        The history is walked newest first, a page at a time, and the walk stops at the commit: a rerun finds its
        publish in the first page however long the history. (`list_repo_commits` would fetch every page before
        answering.) The client's paging retries on its own and takes the configured timeout."""
        marker = f"{DIGEST_TRAILER}: {lineage.request_digest}"
        commits = f"{self.endpoint}/api/models/{repo}/commits/{quote(branch, safe='')}"
        for commit in paginate(commits, params={}, headers=build_hf_headers(), timeout=self.timeout):
            if marker in f"{commit['title']}\n{commit['message']}".splitlines():
                return self._published(spec, repo, commit["id"])
        return None

    def _published(self, spec: PublishSpec, repo: str, sha: str) -> Published:
        return Published(uri=spec.to, version=sha, url=f"{self.endpoint}/{repo}/tree/{sha}")

    # -- requests -----------------------------------------------------------------------------------------------

    def _call(self, call: Callable[[], T]) -> T:
        """An idempotent request the client sends once, retried while the hub fails transiently."""
        def attempt() -> T:
            self._bound_session()
            return call()

        return retrying(attempt, self.retries, transient)

    def _bound_session(self) -> None:
        """Requests with the configured timeout: the client's shared session has none, and create_commit takes
        none, so a stalled hub would hold the job forever. Set before each request, since the client replaces its
        session after a connection error (one replaced inside the client's own retries goes without until the next
        request); a session configured with a timeout of its own is left alone."""
        session = get_session()
        if session.timeout == httpx2.Timeout(None):
            session.timeout = httpx2.Timeout(self.timeout)


def parse(uri: str, field: str) -> tuple[str, str]:
    """(repo id, branch) of `hf://ORG/NAME[@BRANCH]`, by huggingface_hub's own parser."""
    try:
        parsed = parse_hf_uri(uri)
    except HfUriError as error:
        raise BadReference(field, uri, Problems.REFERENCE_INVALID, f"is not a hub publish target "
                           f"(hf://ORG/NAME[@BRANCH]): {error.msg.strip()}") from None
    if parsed.type != "model":
        raise BadReference(field, uri, Problems.REFERENCE_INVALID, f"names a {parsed.type} repo; merged models are "
                           "published to model repos (hf://ORG/NAME[@BRANCH])")
    if parsed.path_in_repo.strip("/"):
        raise BadReference(field, uri, Problems.REFERENCE_INVALID, "names a folder in the repo; a merged model is "
                           "published at the root of a branch (hf://ORG/NAME[@BRANCH], a branch with '/' written "
                           "%2F)")
    branch = parsed.revision or DEFAULT_REVISION
    if branch.startswith("refs/") or constants.REGEX_COMMIT_OID.fullmatch(branch):
        raise BadReference(field, uri, Problems.REFERENCE_INVALID, f"names {branch!r}, which is not a branch; a "
                           "publish is a commit on a branch")
    return parsed.id, branch


# -- what a commit holds ------------------------------------------------------------------------------------------

class _Tally:
    """Progress over the merged files' bytes: as sent, never past their total (an attempt after a moved branch
    sends some again), and the rest once published."""

    def __init__(self, progress: ByteCounter, total: int) -> None:
        self.progress = progress
        self.total = total
        self.done = 0

    def __call__(self, count: int) -> None:
        count = min(count, self.total - self.done)
        if count > 0:
            self.done += count
            self.progress(count)

    def rest(self) -> None:
        self(self.total - self.done)


class _CountedReader(io.BufferedReader):
    """A merged file as the client reads it. After `count_from_here` (the client hashes the file before), how
    far its reads reach is progress: a retried upload counts once. A progress callback that raises (the job was
    cancelled) is remembered, since the client wraps what an upload raises in errors of its own."""

    def __init__(self, path: Path, progress: ByteCounter) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self.progress = progress
        self.reached: int | None = None
        self.stopped: BaseException | None = None

    def count_from_here(self) -> None:
        self.reached = self.tell()

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if self.reached is not None and self.tell() > self.reached:
            sent, self.reached = self.tell() - self.reached, self.tell()
            try:
                self.progress(sent)
            except BaseException as error:
                self.stopped = error
                raise
        return data

    def raise_if_stopped(self) -> None:
        if self.stopped is not None:
            raise self.stopped


def _merged_files(lineage: Lineage) -> list[str]:
    """What is published of the merged folder: all of it but a README.md (the card replaces it)."""
    return sorted(path for path in lineage.manifest_sha256 if path != CARD)


def _reopen(readers: list[_CountedReader], folder: Path, lineage: Lineage, progress: ByteCounter) -> None:
    """Fresh readers of the merged files for one commit attempt (the client's operations keep what the hub said
    of the branch they were sent to, so none outlives its attempt)."""
    for reader in readers:
        reader.close()
    readers[:] = [_CountedReader(folder / path, progress) for path in _merged_files(lineage)]


def _additions(readers: list[_CountedReader], folder: Path, lineage: Lineage,
               spec: PublishSpec) -> Iterator[CommitOperationAdd]:
    """The merged files, each checked against the sha256 the merge wrote (the client hashes them anyway)."""
    for reader in readers:
        path = Path(reader.name).relative_to(folder).as_posix()
        operation = CommitOperationAdd(path, reader)
        if operation.upload_info.sha256.hex() != lineage.manifest_sha256[path]:
            raise Problem(Problems.PUBLISH_FAILED, f"{TO_FIELD}: {spec.to!r}: {path!r} was not published: it changed "
                          "on the server's disk since the merge wrote it", field=TO_FIELD, ref=spec.to)
        reader.count_from_here()
        yield operation


def _card_and_lineage(lineage: Lineage) -> list[CommitOperationAdd]:
    return [CommitOperationAdd(CARD, model_card(lineage).encode()),
            CommitOperationAdd(LINEAGE_FILE, lineage.model_dump_json(indent=2).encode())]


def _deletions(paths: set[str], lineage: Lineage) -> list[CommitOperationDelete]:
    ours = {*lineage.manifest_sha256, CARD, LINEAGE_FILE}
    return [CommitOperationDelete(path) for path in sorted(paths - ours - KEPT)]


def _title(lineage: Lineage) -> str:
    return f"Merged model (adapter-merge job {lineage.job_id})"


def _description(lineage: Lineage) -> str:
    """The commit's message body: git-style trailers, the digest's being what `find` looks for."""
    return (f"Published by adapter-merge {lineage.engine_version}.\n\n{DIGEST_TRAILER}: {lineage.request_digest}\n"
            f"Job-Id: {lineage.job_id}\n")


def model_card(lineage: Lineage) -> str:
    """README.md: metadata for the hub (the base model, the relation, the lineage's tags), and the inputs."""
    base_repo = lineage.base.pinned.get("repo") if lineage.base.ref.startswith("hf://") else None
    relation = {"base_model": base_repo, "base_model_relation": "merge"} if base_repo else {}
    data = ModelCardData(**relation, tags=["adapter-merge", "merge"], adapter_merge=lineage.tags())
    rows = [f"| base | `{lineage.base.ref}` | {_pin(lineage.base.pinned)} | |"]
    rows += [f"| adapter {index} | `{adapter.ref}` | {_pin(adapter.pinned)} | {adapter.weight} |"
             for index, adapter in enumerate(lineage.adapters)]
    options = ", ".join(f"{name} = {value}" for name, value in lineage.options.items())
    return "\n".join([
        "---", data.to_yaml(), "---", "",
        "# Merged model", "",
        f"PEFT adapters merged into their base by adapter-merge {lineage.engine_version} (job `{lineage.job_id}`, "
        f"request digest `{lineage.request_digest}`), in this order:", "",
        "| input | reference | pinned | weight |", "| --- | --- | --- | --- |", *rows, "",
        f"Options: {options}.", "",
        f"Every file's sha256 is in `merge_manifest.json`; the whole lineage, with each input file's identity, in "
        f"`{LINEAGE_FILE}`.", "",
    ])


def _pin(pinned: dict[str, str]) -> str:
    return ", ".join(f"{name} `{value}`" for name, value in pinned.items())


# -- errors -------------------------------------------------------------------------------------------------------

def _stale(error: Exception) -> bool:
    """The hub's answer to a commit whose parent is no longer the branch's head."""
    return isinstance(error, HfHubHTTPError) and http_status(error) == STALE_PARENT


@contextmanager
def _problems(spec: PublishSpec, readers: list[_CountedReader] | None = None) -> Iterator[None]:
    """Client failures as problems; but a progress callback's exception (a cancelled job) as itself."""
    try:
        yield
    except (*HUB_ERRORS, ValueError, RuntimeError) as error:
        for reader in readers or []:
            reader.raise_if_stopped()
        if isinstance(error, RuntimeError) and not isinstance(error.__cause__, (*HUB_ERRORS, ValueError)):
            raise
        raise _problem(error, spec) from None


def _problem(error: Exception, spec: PublishSpec) -> Problem:
    """A failure while publishing: a hub out of reach is a 503 (try again later); one that refused is
    publish-failed, naming the repo and the hub's reason."""
    if isinstance(error, RuntimeError) and isinstance(error.__cause__, (*HUB_ERRORS, ValueError)):
        error = error.__cause__  # the client wraps a failed LFS upload
    if transient(error) or not isinstance(error, HfHubHTTPError | ValueError):
        return RegistryUnavailable(TO_FIELD, spec.to, reason(error))
    if isinstance(error, HfHubHTTPError):
        why = f"the hub refused it ({reason(error)}"
        if http_status(error) in (401, 403) or isinstance(error, RepositoryNotFoundError):
            why = f"the hub refused the service's token ({reason(error)}"
        message = (error.server_message or "").strip().splitlines()
        why += f": {message[0]})" if message else ")"
    else:
        why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return Problem(Problems.PUBLISH_FAILED, f"{TO_FIELD}: {spec.to!r} could not be published: {why}",
                   field=TO_FIELD, ref=spec.to)
