"""The interface every source implements, and what a pinned reference looks like."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adapter_merge.core.problems import Problem, Problems
from adapter_merge.core.refs import BadReference


class PinnedFile(BaseModel):
    """One file of a pinned version, with what the registry says it holds (checked after download)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="Path inside the model or adapter folder.")
    size: int
    sha256: str | None = Field(None, description="Content sha256 the registry vouches for (hub LFS, S3 checksum).")
    etag: str | None = Field(None, description="The registry's ETag of this version of the file.")
    md5: str | None = Field(None, description="Content MD5, where the registry's ETag is one (a single-part S3 "
                            "upload without KMS or customer keys).")
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
        raise BadReference(field, ref, Problems.REFERENCE_INVALID, f"holds {fields.get('path')!r}, which is not a "
                           "path inside a folder") from None


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
