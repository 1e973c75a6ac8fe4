"""Serving result files over HTTP: single byte ranges, conditional requests, and a streamed tar archive.

Files are read in chunks so a multi-GB shard never sits in memory; the tar is assembled on the fly from
headers and file contents, so its length is known up front and no copy of the model is written to disk.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import Response
from fastapi.responses import StreamingResponse

from adapter_merge.core.problems import Problem, Problems

CHUNK_BYTES = 1024 * 1024
TAR_BLOCK = 512
MAX_POSITION_DIGITS = 18
ARTIFACT_MEDIA_TYPE = "application/octet-stream"
_RANGE = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int
    """Inclusive, as in Content-Range."""

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def _unsatisfiable(header: str, size: int, why: str) -> Problem:
    shown = header if len(header) <= 100 else header[:100] + "..."
    return Problem(Problems.RANGE_NOT_SATISFIABLE, f"Range header {shown!r}: {why} (file size {size} bytes)",
                   headers={"Content-Range": f"bytes */{size}"}, field="Range")


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """One `bytes=` range -> ByteRange; None to send the whole file.

    Other units are ignored as RFC 9110 requires. A malformed range, several ranges (not supported) or a
    range past the end is a 416 naming the header.
    """
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes":
        return None
    if "," in spec:
        raise _unsatisfiable(header, size, "only a single range is supported")
    match = _RANGE.match(spec)
    if not match or match.groups() == ("", ""):
        raise _unsatisfiable(header, size, "expected bytes=START-END, bytes=START- or bytes=-SUFFIX")
    first, last = (_position(group) if group else None for group in match.groups())
    if first is None:
        assert last is not None
        suffix = last
        if suffix == 0 or size == 0:
            raise _unsatisfiable(header, size, "an empty suffix range selects nothing")
        return ByteRange(max(0, size - suffix), size - 1)
    start = first
    if last is not None and last < start:
        raise _unsatisfiable(header, size, "the range ends before it starts")
    if start >= size:
        raise _unsatisfiable(header, size, "the range starts at or past the end of the file")
    end = last if last is not None else size - 1
    return ByteRange(start, min(end, size - 1))


def _position(digits: str) -> int:
    """A byte position; one longer than any file can be reads as 'past the end' (Python would refuse to
    parse thousands of digits, and no file is that large anyway)."""
    return int(digits) if len(digits) <= MAX_POSITION_DIGITS else 10**MAX_POSITION_DIGITS


def _etag_matches(header: str | None, etag: str) -> bool:
    if header is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in header.split(",")]
    return "*" in tags or etag in tags


def read_chunks(path: Path, start: int = 0, length: int | None = None) -> Iterator[bytes]:
    with path.open("rb") as handle:
        handle.seek(start)
        remaining = length if length is not None else path.stat().st_size - start
        while remaining > 0:
            chunk = handle.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                raise OSError(f"{path}: shorter than expected while streaming")
            remaining -= len(chunk)
            yield chunk


def file_response(
    path: Path, sha256: str, *, method: str, range_header: str | None, if_none_match: str | None,
    if_range: str | None,
) -> Response:
    """The file (or the requested part) with Content-Length, ETag (its sha256) and Accept-Ranges."""
    size = path.stat().st_size
    etag = f'"{sha256}"'
    media_type = ARTIFACT_MEDIA_TYPE  # a download, whatever the file holds: one documented type for every artifact
    headers = {"ETag": etag, "Accept-Ranges": "bytes",
               "Content-Disposition": f'attachment; filename="{path.name}"'}
    if _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    byte_range = None if if_range is not None and if_range.strip() != etag else parse_range(range_header, size)
    status, start, length = 200, 0, size
    if byte_range is not None:
        status, start, length = 206, byte_range.start, byte_range.length
        headers["Content-Range"] = f"bytes {byte_range.start}-{byte_range.end}/{size}"
    headers["Content-Length"] = str(length)
    if method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=media_type)
    return StreamingResponse(read_chunks(path, start, length), status_code=status, headers=headers,
                             media_type=media_type)


def _tar_header(name: str, size: int, mtime: float) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = size, int(mtime), 0o644, tarfile.REGTYPE
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


def _padding(size: int) -> bytes:
    return b"\0" * (-size % TAR_BLOCK)


def tar_stream(root: Path, files: Iterable[str], prefix: str, mtime: float) -> tuple[int, Iterator[bytes]]:
    """(exact length, chunks) of a POSIX tar of `files` (paths relative to `root`) under `prefix/`."""
    entries = []
    for relative in files:
        path = root / relative
        size = path.stat().st_size
        entries.append((path, size, _tar_header(f"{prefix}/{relative}", size, mtime)))
    length = sum(len(header) + size + len(_padding(size)) for _, size, header in entries) + 2 * TAR_BLOCK

    def chunks() -> Iterator[bytes]:
        for path, size, header in entries:
            yield header
            yield from read_chunks(path, 0, size)
            yield _padding(size)
        yield b"\0" * (2 * TAR_BLOCK)

    return length, chunks()
