"""Hugging Face hub repos: `hf://ORG/NAME[@REVISION][/SUBFOLDER]`, parsed by huggingface_hub itself.

Pinned to the commit sha the revision names at submit time (`model_info(..., files_metadata=True)`, which also
gives each file's size, and its sha256 for LFS files, or its git blob id for the others). Bytes come from the
resolve URL at that sha, through the client's own session (its offline switch and client factory apply) and
headers (its token): the hub redirects LFS files to its CDN, and the session drops the token on the way there.
A branch whose name holds a `/` is written with it encoded (`@release%2F2025`); `refs/pr/N` is written as is.

Configuration is the client's: `HF_ENDPOINT` (read when huggingface_hub is imported) and the token it finds
(`HF_TOKEN`, the token file), looked up on every request so that a refreshed token is used. The client has no
retry policy for these calls: `retrying` adds one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx2
from huggingface_hub import HfApi, constants, get_session, hf_hub_url, parse_hf_uri
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    HfUriError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import ModelInfo
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

from adapter_merge.core.problems import Problem, Problems
from adapter_merge.core.refs import BadReference
from adapter_merge.core.settings import Settings
from adapter_merge.core.sources.base import PinnedFile, PinnedInput, RegistryUnavailable
from adapter_merge.core.sources.transfer import (
    StreamedSource,
    fetch_failed,
    range_header,
    retrying,
    skip_bytes,
)

DEFAULT_REVISION = "main"
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
CHUNK_BYTES = 1 << 20
HUB_ERRORS = (HfHubHTTPError, httpx2.TransportError, OfflineModeIsEnabled)
"""What a request to the hub raises when it fails: an answer with an error, no answer, or offline mode."""


class HubSource(StreamedSource):
    scheme = "hf"
    STREAM_ERRORS = (httpx2.TransportError,)

    def __init__(self, settings: Settings) -> None:
        self.endpoint = constants.ENDPOINT
        self.api = HfApi(endpoint=self.endpoint)
        self.timeout = settings.download_timeout_seconds
        self.retries = settings.download_retries

    # -- pin ----------------------------------------------------------------------------------------------------

    def pin(self, ref: str, field: str) -> PinnedInput:
        repo, revision, subfolder = _parse(ref, field)
        try:
            info = retrying(lambda: self.api.model_info(repo, revision=revision, files_metadata=True,
                                                        timeout=self.timeout), self.retries, transient)
        except HUB_ERRORS as error:
            raise _pin_problem(error, field, ref, revision) from None
        files = _files_under(info, subfolder, field, ref)
        if not files:
            raise BadReference(field, ref, Problems.REFERENCE_NOT_FOUND, f"has no files under {subfolder!r} at "
                               f"revision {revision!r}" if subfolder else f"has no files at revision {revision!r}")
        version = {"repo": repo, "commit": str(info.sha)}
        if subfolder:
            version["subfolder"] = subfolder
        return PinnedInput(ref=ref, scheme=self.scheme, version=version, files=files)

    # -- bytes --------------------------------------------------------------------------------------------------

    @contextmanager
    def open_stream(self, pinned: PinnedInput, file: PinnedFile, first: int, last: int | None, *,
                    reading: bool) -> Iterator[Iterator[bytes]]:
        """A GET of the resolve URL at the pinned commit, retried while it fails transiently. A server that
        ignores the Range (some mirrors) sends the whole file: its head is skipped."""
        url = hf_hub_url(pinned.version["repo"], file.location or file.path, revision=pinned.version["commit"],
                         endpoint=self.endpoint)
        headers = build_hf_headers(headers=range_header(first, last))

        def attempt() -> httpx2.Response:
            session = get_session()
            request = session.build_request("GET", url, headers=headers, timeout=httpx2.Timeout(self.timeout))
            response = session.send(request, stream=True)
            if response.status_code >= 400:
                response.read()
                response.close()
                hf_raise_for_status(response)
            return response

        try:
            response = retrying(attempt, self.retries, transient)
        except HUB_ERRORS as error:
            unreachable = reading and (transient(error) or isinstance(error, OfflineModeIsEnabled))
            raise fetch_failed(pinned, file, f"{reason(error)} at commit {pinned.version['commit']}",
                               unreachable=unreachable) from None
        try:
            yield skip_bytes(response.iter_bytes(CHUNK_BYTES), first if response.status_code == 200 else 0)
        finally:
            response.close()

    def describe(self, error: Exception) -> str:
        return reason(error)


def _parse(ref: str, field: str) -> tuple[str, str, str]:
    """(repo id, revision, subfolder) of an `hf://` reference; only model repos."""
    try:
        uri = parse_hf_uri(ref)
    except HfUriError as error:
        hint = " (a revision is written @REVISION)" if ":" in ref.removeprefix("hf://") else ""
        raise BadReference(field, ref, Problems.REFERENCE_INVALID, f"is not a hub reference "
                           f"(hf://ORG/NAME[@REVISION][/SUBFOLDER]){hint}: {error.msg.strip()}") from None
    if uri.type != "model":
        raise BadReference(field, ref, Problems.REFERENCE_INVALID, f"names a {uri.type} repo; only model repos "
                           "can be merged (hf://ORG/NAME)")
    subfolder = uri.path_in_repo.strip("/")
    if any(part in (".", "..") for part in subfolder.split("/")):
        raise BadReference(field, ref, Problems.REFERENCE_INVALID, "has a subfolder that leaves the repo")
    return uri.id, uri.revision or DEFAULT_REVISION, subfolder


def _files_under(info: ModelInfo, subfolder: str, field: str, ref: str) -> list[PinnedFile]:
    """The repo's files under `subfolder`, named relative to it, with what the hub vouches for."""
    prefix = f"{subfolder}/" if subfolder else ""
    files = []
    for sibling in info.siblings or []:
        if not sibling.rfilename.startswith(prefix):
            continue
        if sibling.size is None:
            raise RegistryUnavailable(field, ref, "the hub listed its files without their sizes")
        lfs = sibling.lfs
        files.append(PinnedFile(path=sibling.rfilename[len(prefix):], size=sibling.size,
                                sha256=lfs.sha256 if lfs else None, etag=None if lfs else sibling.blob_id,
                                location=sibling.rfilename))
    return files


def transient(error: Exception) -> bool:
    """Worth another try: no answer, a dropped connection, or a busy or failing hub."""
    if isinstance(error, httpx2.TransportError):
        return True
    return isinstance(error, HfHubHTTPError) and http_status(error) in TRANSIENT_STATUSES


def http_status(error: HfHubHTTPError) -> int | None:
    return error.response.status_code if error.response is not None else None


def reason(error: Exception) -> str:
    """Why a request failed, in words that name no URL or credential."""
    if isinstance(error, httpx2.TimeoutException):
        return "no answer in time"
    if isinstance(error, httpx2.TransportError):
        return "connection failed"
    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set"
    if isinstance(error, HfHubHTTPError):
        return f"HTTP {http_status(error)}"
    return type(error).__name__


def _pin_problem(error: Exception, field: str, ref: str, revision: str) -> Problem:
    if isinstance(error, GatedRepoError | DisabledRepoError):
        return BadReference(field, ref, Problems.REFERENCE_FORBIDDEN, "is gated or disabled on the hub: the "
                            "service's token has no access to it")
    if isinstance(error, RepositoryNotFoundError):
        return BadReference(field, ref, Problems.REFERENCE_NOT_FOUND, "is not a model repo on the hub (or it is "
                            "private and the service's token cannot read it)")
    if isinstance(error, RevisionNotFoundError):
        return BadReference(field, ref, Problems.REFERENCE_NOT_FOUND, f"has no revision {revision!r}")
    if isinstance(error, HfHubHTTPError) and http_status(error) in (401, 403):
        return BadReference(field, ref, Problems.REFERENCE_FORBIDDEN, f"cannot be read: the hub refused the "
                            f"service's token ({reason(error)})")
    if transient(error) or isinstance(error, OfflineModeIsEnabled):
        return RegistryUnavailable(field, ref, reason(error))
    return BadReference(field, ref, Problems.REFERENCE_INVALID, f"was refused by the hub ({reason(error)})")

