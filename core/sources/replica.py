"""What the API's preflight plans on for a remote input: a local stand-in of its folder holding only what
planning reads. JSON files (and a legacy `.bin` adapter) are fetched whole; a safetensors file gets its real
header (two ranged reads: the 8-byte length, then the header) in a sparse file of its real size, so every
offset check holds while no tensor data is downloaded; other files are sparse placeholders of their size.

The worker starts a merge on the same stand-in while the rest downloads (worker/downloads.py): `read_whole`
says which files it fetches before planning, `header_bytes` and `write_placeholder` make the others (reading a
header from the file's own download rather than by ranged reads).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

from adapter_merge.core.sources.base import PinnedFile, PinnedInput, RemoteSource
from adapter_merge.worker.engine.safetensors_format import MAX_HEADER_BYTES

WHOLE_FILE_LIMIT = 64 * 1024 * 1024
"""Largest JSON or legacy adapter file fetched whole for planning; real ones are far smaller."""


def build_replica(source: RemoteSource, pinned: PinnedInput, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for file in pinned.files:
        whole = read_whole(file)
        head = source.read_range(pinned, file, 0, file.size) if whole else header_bytes(
            file, lambda start, length, file=file: source.read_range(pinned, file, start, length))
        write_placeholder(folder / file.path, file.size, head)
    return folder


def read_whole(file: PinnedFile) -> bool:
    """Planning reads all of `file`: a JSON file or a legacy adapter's pickle, of a size real ones have."""
    return file.path.endswith((".json", ".bin")) and file.size <= WHOLE_FILE_LIMIT


def header_bytes(file: PinnedFile, read: Callable[[int, int], bytes]) -> bytes:
    """The leading bytes of `file` that planning reads, when it does not read it whole: a safetensors file's
    header (with its length), nothing of any other file. `read(start, length)` reads the file's bytes."""
    if not (file.path.endswith(".safetensors") and file.size >= 8):
        return b""
    prefix = read(0, 8)
    (header_length,) = struct.unpack("<Q", prefix)
    if header_length > min(MAX_HEADER_BYTES, file.size - 8):
        return prefix  # the engine reports the bad length, naming the file
    return prefix + read(8, header_length)


def write_placeholder(target: Path, size: int, head: bytes) -> None:
    """`head`, then a hole up to `size` bytes: a file the engine can plan on, and that reads as zeros past it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as handle:
        handle.write(head)
        handle.truncate(size)
