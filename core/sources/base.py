"""The interface every source implements, what a pinned reference looks like, and the retry policy the remote
sources share (backoff between attempts, resuming a transfer that broke off)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adapter_merge.core.problems import Problem, Problems


class PinnedFile(BaseModel):
    """One file of a pinned version, with what the registry says it holds (checked after download)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="Path inside the model or adapter folder.")
    size: int
    sha256: str | None = Field(None, description="Content sha256 the registry vouches for (hub LFS, S3 checksum).")
    etag: str | None = Field(None, description="The registry's ETag of this version of the file.")
    version_id: str | None = Field(None, description="Object version (versioned S3 buckets).")
    location: str | None = Field(None, description="Where the source finds the bytes (an S3 key, an artifact path).")

    @field_validator("path")
    @classmethod
    def _stays_inside(cls, path: str) -> str:
        """A registry's listing names files inside the folder: never `..`, an absolute path or an empty part."""
        parts = path.split("/")
        if not path or path.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\x00" in path:
            raise ValueError(f"file path {path!r} does not stay inside its folder")
        return path


class PinnedInput(BaseModel):
    """A reference resolved to an immutable version: what a worker fetches, whatever moves after submit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ref: str = Field(description="The reference as the client wrote it.")
    scheme: str = Field(description="file, hf, s3 or models (or a plugin's).")
    version: dict[str, str] = Field(description="What pins it: a commit sha, a model version and run id, ...")
    files: list[PinnedFile] = Field(default_factory=list, description="Its files; empty for a local folder.")
    local_path: str | None = Field(None, description="A local folder's real path (file references only).",
                                   exclude=True)

    @property
    def cache_key(self) -> str:
        """Names the pinned version in the download cache: same key, same bytes."""
        parts = [self.scheme, *(f"{name}={value}" for name, value in sorted(self.version.items()))]
        return "/".join(part.replace("/", "%2F") for part in parts)

    @property
    def total_bytes(self) -> int:
        return sum(file.size for file in self.files)


def listed_file(field: str, ref: str, **fields: Any) -> PinnedFile:
    """A file as a registry listed it; one whose name cannot be a path inside a folder (`a//b`, `../x`: S3 keys
    may be anything) makes the reference unusable, as such a file would a local folder."""
    try:
        return PinnedFile(**fields)
    except ValidationError:
        raise Problem(Problems.REFERENCE_INVALID, f"{field}: {ref!r} holds {fields.get('path')!r}, which is not a "
                      "path inside a folder", field=field, ref=ref) from None


ByteCounter = Callable[[int], None]
"""Told how many more bytes arrived, as they arrive (progress)."""


class Source(Protocol):
    scheme: str

    def pin(self, ref: str, field: str) -> PinnedInput:
        """Resolve `ref` (named by request field `field`) to an immutable version and list its files; raise a
        `Problem` (422 for a malformed or missing reference, 503 for an unreachable registry)."""
        ...


@runtime_checkable
class RemoteSource(Source, Protocol):
    """A source whose files are fetched (a local folder is read in place and needs none of this)."""

    def read_range(self, pinned: PinnedInput, file: PinnedFile, start: int, length: int) -> bytes:
        """`length` bytes of `file` from `start` (fewer at its end); raise a `Problem` naming the ref (the caller
        knows the request field): 503 for a registry out of reach, 502 download-failed for a file that cannot be
        read as pinned."""
        ...

    def download(self, pinned: PinnedInput, file: PinnedFile, dest: Path, progress: ByteCounter) -> None:
        """Write `file` to `dest` (which does not exist yet), reporting bytes as they arrive; raise a
        download-failed `Problem` naming the ref and the file when it cannot be had as pinned."""
        ...


class RegistryUnavailable(Problem):
    """A registry that cannot be reached, or that failed: try again later."""

    RETRY_SECONDS = 15

    def __init__(self, field: str | None, ref: str, reason: str) -> None:
        """`field` is None where the request field is not known (reading a pinned file names the ref only)."""
        where = f"{field}: {ref!r}" if field else repr(ref)
        super().__init__(Problems.REGISTRY_UNAVAILABLE, f"{where}: the registry cannot be reached ({reason}); "
                         "try again", retry_after=self.RETRY_SECONDS, field=field, ref=ref)


def fetch_failed(pinned: PinnedInput, file: PinnedFile, reason: str, *, unreachable: bool) -> Problem:
    """A pinned file that could not be read: while planning, a registry out of reach is a 503 as at pinning
    (`unreachable`); anything else, and any failure of a download, is download-failed naming the file."""
    if unreachable:
        return RegistryUnavailable(None, pinned.ref, reason)
    return Problem(Problems.DOWNLOAD_FAILED, f"{pinned.ref!r}: file {file.path!r} could not be fetched as pinned: "
                   f"{reason}", ref=pinned.ref, file=file.path)


BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 8.0
T = TypeVar("T")


def backoff_seconds(retry: int) -> float:
    """The pause before retry number `retry` (0 for the first): 0.5 s, doubling, at most 8 s."""
    return min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2**retry)


def retrying(call: Callable[[], T], retries: int, transient: Callable[[Exception], bool]) -> T:
    """`call()`, made again after a transient failure (`transient(error)`: a timeout, a dropped connection, a 5xx)
    at most `retries` times with backoff; any other failure, or the last one, propagates. For clients that have no
    retry policy of their own (boto3 and MLflow's transport do)."""
    retry = 0
    while True:
        try:
            return call()
        except Exception as error:
            if retry >= retries or not transient(error):
                raise
        time.sleep(backoff_seconds(retry))
        retry += 1


def download_resuming(chunks_from: Callable[[int], Iterable[bytes]], size: int, dest: Path, progress: ByteCounter,
                      retries: int, broken: Callable[[Exception], bool]) -> None:
    """Write to `dest` the `size` bytes that `chunks_from(offset)` streams from `offset` on. A transfer that breaks
    off half-way (`broken(error)`, or a stream that ends short) is resumed where it stopped, after a backoff; after
    `retries` breaks in a row with no byte in between, the last error propagates. Request retries cannot cover
    this: the request succeeded, its body did not arrive. `chunks_from` raises a `Problem` for what resuming
    cannot mend (the object changed, the registry refused)."""
    written, failures = 0, 0
    with dest.open("wb") as out:
        while True:
            before = written
            try:
                for chunk in chunks_from(written):
                    out.write(chunk)
                    written += len(chunk)
                    progress(len(chunk))
                if written >= size:
                    return
                raise EOFError(f"the stream ended after {written} of {size} bytes")
            except Exception as error:
                failures = 1 if written > before else failures + 1
                if failures > retries or not (isinstance(error, EOFError) or broken(error)):
                    raise
            time.sleep(backoff_seconds(failures - 1))


def skip_bytes(chunks: Iterable[bytes], count: int) -> Iterator[bytes]:
    """`chunks` without their first `count` bytes: what to do with the whole file a server sends when it ignores a
    Range (some hub mirrors, an artifact proxy in front of another store)."""
    for chunk in chunks:
        if count >= len(chunk):
            count -= len(chunk)
            continue
        yield chunk[count:]
        count = 0


def first_bytes(chunks: Iterable[bytes], length: int) -> bytes:
    """The first `length` bytes of `chunks` (fewer if they end first), reading no further: a range cut from a
    whole file costs only the bytes before its end."""
    data = bytearray()
    for chunk in chunks:
        data += chunk[:length - len(data)]
        if len(data) >= length:
            break
    return bytes(data)


def range_header(first: int, last: int | None = None) -> dict[str, str]:
    """The Range header asking bytes `first` to `last` (to the end if None); none for the whole file."""
    if not first and last is None:
        return {}
    return {"Range": f"bytes={first}-{'' if last is None else last}"}
