"""One artifact's way to disk, for both clients: bytes go to `<name>.partial`, an interrupted download resumes
from its end (`Range`, guarded by `If-Range` with the file's ETag, so a changed file is sent whole), the
sha256 is checked over the whole file, and only a verified file is renamed to its final name."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from adapter_merge.client.errors import ChecksumMismatch, JobNotSucceeded
from adapter_merge.client.models import Artifact, Job

CHUNK_BYTES = 1 << 20
PARTIAL_SUFFIX = ".partial"


def _sha256(path: Path) -> hashlib._Hash:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest


class Transfer:
    """One artifact into `dest`: what to ask for, where its bytes go, and whether they may stay."""

    def __init__(self, artifact: Artifact, dest: Path) -> None:
        relative = PurePosixPath(artifact.path)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"artifact path {artifact.path!r} leads outside {dest}")
        self.artifact = artifact
        self.final = dest.joinpath(*relative.parts)
        self.partial = self.final.with_name(self.final.name + PARTIAL_SUFFIX)
        self.digest = hashlib.sha256()
        self.offset = 0

    def already_there(self) -> bool:
        """The final file exists with the advertised size and sha256 (a download run before)."""
        return (self.final.is_file() and self.final.stat().st_size == self.artifact.size
                and _sha256(self.final).hexdigest() == self.artifact.sha256)

    def request_headers(self) -> dict[str, str]:
        """Resume a partial file shorter than the artifact; start afresh otherwise."""
        self.final.parent.mkdir(parents=True, exist_ok=True)
        size = self.partial.stat().st_size if self.partial.is_file() else 0
        if 0 < size < self.artifact.size:
            self.offset = size
            return {"Range": f"bytes={size}-", "If-Range": f'"{self.artifact.sha256}"'}
        self.offset = 0
        return {}

    @contextmanager
    def receiving(self, status: int) -> Iterator[Callable[[bytes], None]]:
        """A writer for the body: appends on a 206 (the partial's bytes hashed first), rewrites on a 200 (the
        whole file, e.g. because it changed since the partial was written)."""
        resumed = status == 206 and self.offset > 0
        self.digest = _sha256(self.partial) if resumed else hashlib.sha256()
        with self.partial.open("ab" if resumed else "wb") as handle:
            def write(chunk: bytes) -> None:
                handle.write(chunk)
                self.digest.update(chunk)

            yield write

    def finish(self) -> None:
        """Check the whole file's sha256; rename it into place, or remove it and raise."""
        actual = self.digest.hexdigest()
        if actual != self.artifact.sha256:
            self.partial.unlink(missing_ok=True)
            raise ChecksumMismatch(self.artifact.path, self.artifact.sha256, actual)
        os.replace(self.partial, self.final)


def transfers(job: Job, dest: Path) -> Iterator[Transfer]:
    """Every artifact of a succeeded job on its way into `dest`, for both clients (they only move the bytes); any
    other job has nothing to download. Made one by one as the download reaches them: an artifact whose path leads
    outside `dest` stops it there."""
    if job.status != "succeeded":
        raise JobNotSucceeded(job, f"job {job.id} is {job.status}: nothing to download")
    return (Transfer(artifact, dest) for artifact in job.artifacts)
