"""What a caller hands the engine and what it gets back: plain data, no torch."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from adapter_merge.worker.engine.errors import InputError

OutputDtype = Literal["auto", "bfloat16", "float16", "float32"]
OUTPUT_DTYPES: tuple[str, ...] = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter folder and the multiplier applied to its scaling (PEFT's `set_scale`)."""

    path: Path
    weight: float = 1.0


@dataclass(frozen=True)
class MergeOptions:
    dtype: OutputDtype = "auto"
    max_shard_size: int | None = None
    """Bytes per output shard; None keeps the base model's shard layout."""
    overwrite: bool = False
    checksum_cache: Path | None = None
    """Folder where input checksums are remembered between merges; None hashes every input every time."""
    fsync: bool = False
    """Flush every output file and the folder to disk around the rename into place. Off, like `cp`, files
    reach disk when the kernel writes them back; the service turns it on before it reports success."""
    allowed_roots: tuple[Path, ...] | None = None
    """Folders the inputs must lie in; None (the command line) reads any file it is given. When set, every
    input file is read through its real path, which must be inside a root, and must be a regular file (links
    within the roots are followed), and the manifest names input folders relative to their root."""
    await_file: Callable[[Path], None] | None = None
    """Called with an input file's path before its contents are read (tensor data, checksums, copies), never
    before planning reads a safetensors header: returns once the file is complete, or raises to stop the
    merge. For a caller that starts merging while inputs still download (the service's worker); the engine's
    only hook for it, kept this small on purpose."""
    input_names: Mapping[Path, str] = field(default_factory=dict, hash=False)
    """How the manifest names the input folders given here, instead of by their path: the service names a
    downloaded input by the reference its client sent (`s3://...`), not by the cache folder it was read from."""

    def __post_init__(self) -> None:
        if self.allowed_roots is not None:
            roots = (self.allowed_roots,) if isinstance(self.allowed_roots, str | Path) else self.allowed_roots
            object.__setattr__(self, "allowed_roots", tuple(Path(root) for root in roots))
        if self.dtype not in OUTPUT_DTYPES:
            raise InputError(f"dtype: {self.dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}", option="dtype")
        if self.max_shard_size is not None and self.max_shard_size <= 0:
            raise InputError(f"max_shard_size: must be positive, got {self.max_shard_size}", option="max_shard_size")


@dataclass(frozen=True)
class Progress:
    """Reported after every output tensor, so a caller can show a bar or update a job record."""

    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int


ProgressCallback = Callable[[Progress], None]
StopCheck = Callable[[], bool]


@dataclass
class MergeReport:
    """The outcome of a merge, for the caller's summary or job record."""

    output_dir: Path
    tensors_total: int
    tensors_merged: int
    tensors_copied: int
    bytes_written: int
    files: list[dict[str, Any]]
    """Each output file: path (relative), size, sha256."""
    timings: dict[str, float]
    """Seconds per phase: plan, merge (reading, computing and writing tensors), finalize, total."""
    peak_rss_bytes: int
    """The process's peak resident memory so far (getrusage): the merge's own peak only in a process that
    runs one merge, as the CLI and the service's per-job worker processes do."""
    notes: list[str] = field(default_factory=list)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as Hugging Face uses them; KiB/MiB/GiB are binary)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise InputError(f"max_shard_size: {text!r} is not a size like 5GB, 500MB or 2GiB", option="max_shard_size")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "B").upper()])
