"""The safetensors container, read and written without torch.

Reading parses and validates the header only (tensor data stays on disk, read later by offset), so that a
corrupt file is reported by name before any output exists and so that the API can preflight without torch.
Writing builds the header up front from names, dtypes and shapes: a shard's layout is fixed before its
first tensor is computed, which is what lets the engine stream tensors straight into place. `same_bytes`
compares two stored tensors' data, for the one planning question headers cannot answer (a tied pair).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from adapter_merge.worker.engine.errors import InputError, InputRef, brief
from adapter_merge.worker.engine.input_files import InputFiles, unreadable
from adapter_merge.worker.engine.safe_json import JsonError, parse_json
from adapter_merge.worker.engine.tensor_info import DTYPE_SIZES, SafetensorsBytes, TensorInfo

MAX_HEADER_BYTES = 16 * 2**20
"""Real headers are a few hundred KB at most (about 100 bytes per tensor, a few thousand tensors per shard);
16 MiB is room for 160,000 tensors in one file. Parsed JSON takes 10-30 times its size in memory, so this
bounds a hostile header to a few hundred MB and about a second (the safetensors library allows 100 MB)."""
MAX_NAME_CHARS = 1024
"""Characters in a tensor name: real ones are under 200, and messages quote them."""
MAX_DIMS = 32
"""Dimensions of one tensor; real ones have at most 5 (a 3-D convolution)."""
INT64_MAX = 2**63 - 1
"""Every dimension, element count and offset must fit torch's int64 sizes."""
HEADER_ALIGNMENT = 8


@dataclass(frozen=True)
class SafetensorsFile:
    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    """In file order (by data offset)."""


def _corrupt(path: Path, input: InputRef, detail: str, tensor: str | None = None) -> InputError:
    return InputError(f"{path}: not a valid safetensors file: {detail}", file=path, tensor=tensor, input=input)


def read_header(path: Path, input: InputRef, files: InputFiles) -> SafetensorsFile:
    """Parse and validate a safetensors header; every offset is checked against the real file size.

    `input` says which merge input the file is; each tensor and any error records it."""
    with files.open(path, input, contents=False) as handle:
        try:
            file_size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, input, f"file is {file_size} bytes, too short for the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > file_size - 8:
                raise _corrupt(path, input, f"header length {header_len} exceeds the file size {file_size}")
            if header_len > MAX_HEADER_BYTES:
                raise _corrupt(path, input, f"header of {header_len} bytes is larger than the {MAX_HEADER_BYTES} "
                               f"bytes this engine reads")
            raw_header = handle.read(header_len)
        except OSError as error:
            raise unreadable(path, input, error) from error
    try:
        header = parse_json(raw_header)
    except JsonError as error:
        raise _corrupt(path, input, f"header {error}") from error
    if not isinstance(header, dict):
        raise _corrupt(path, input, "header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise _corrupt(path, input, "__metadata__ is not an object of strings")
    data_start = 8 + header_len
    data_size = file_size - data_start
    placed = [_parse_entry(path, input, name, entry, data_start, data_size) for name, entry in header.items()]
    placed.sort(key=lambda offset_and_info: offset_and_info[0])
    _check_contiguous(path, input, placed, data_start, data_start + data_size)
    return SafetensorsFile(path=path, metadata=metadata, tensors={info.name: info for _, info in placed})


def is_int64(value: object) -> bool:
    """A JSON (or pickled) integer that fits int64 and is not negative; booleans are not integers here."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT64_MAX


def shape_problem(shape: object) -> str | None:
    """Why `shape` is not a tensor shape torch can hold (a list of int64 sizes whose product fits int64, even
    ignoring zero sizes, so no stride overflows), or None if it is one."""
    if not isinstance(shape, list | tuple) or len(shape) > MAX_DIMS or not all(is_int64(d) for d in shape):
        return f"is not a list of at most {MAX_DIMS} non-negative int64 sizes"
    if math.prod(max(size, 1) for size in shape) > INT64_MAX:
        return "has more elements than int64 can count"
    return None


def _parse_entry(path: Path, input: InputRef, name: str, entry: object, data_start: int,
                 data_size: int) -> tuple[int, TensorInfo]:
    """One header entry, validated on its own, with its absolute offset (its place among the others is
    checked next)."""

    def corrupt(detail: str) -> InputError:
        return _corrupt(path, input, detail, name)

    if len(name) > MAX_NAME_CHARS:
        raise _corrupt(path, input, f"tensor name {brief(name)} is longer than {MAX_NAME_CHARS} characters")
    if not isinstance(entry, dict):
        raise corrupt(f"entry for tensor {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise corrupt(f"tensor {name!r} has unsupported dtype {brief(dtype)}")
    if (problem := shape_problem(shape)) is not None:
        raise corrupt(f"tensor {name!r} has an invalid shape {brief(shape)}: it {problem}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(is_int64(o) for o in offsets)
        or not offsets[0] <= offsets[1]
    ):
        raise corrupt(f"tensor {name!r} has invalid data_offsets {brief(offsets)}")
    begin, end = offsets
    if end > data_size:
        raise corrupt(f"tensor {name!r} ends at byte {end}, past the end of the data ({data_size} bytes)")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise corrupt(f"tensor {name!r} spans {end - begin} bytes but {dtype}{shape} needs {expected}")
    offset = data_start + begin
    return offset, TensorInfo(name, dtype, tuple(shape), SafetensorsBytes(path, offset), input)


def _check_contiguous(path: Path, input: InputRef, placed: list[tuple[int, TensorInfo]], data_start: int,
                      data_end: int) -> None:
    """The tensors, in offset order, must tile the data exactly."""
    position = data_start
    for offset, info in placed:
        if offset != position:
            problem = "overlaps the previous tensor" if offset < position else "leaves a gap before it"
            raise _corrupt(path, input, f"tensor {info.name!r} {problem}", info.name)
        position = offset + info.nbytes
    if position != data_end:
        raise _corrupt(path, input, f"{data_end - position} bytes after the last tensor")


COMPARE_CHUNK_BYTES = 8 * 1024 * 1024


def same_bytes(first: TensorInfo, second: TensorInfo, files: InputFiles) -> bool:
    """Whether two stored tensors are identical (dtype, shape and every byte), read and compared in chunks.

    Only safetensors byte ranges are compared; a legacy pickled tensor never counts as the same."""
    a, b = first.location, second.location
    if (first.dtype, first.shape) != (second.dtype, second.shape):
        return False
    if not (isinstance(a, SafetensorsBytes) and isinstance(b, SafetensorsBytes)):
        return False
    with files.open(a.file, first.input) as a_file, files.open(b.file, second.input) as b_file:
        a_file.seek(a.offset)
        b_file.seek(b.offset)
        for start in range(0, first.nbytes, COMPARE_CHUNK_BYTES):
            size = min(COMPARE_CHUNK_BYTES, first.nbytes - start)
            if a_file.read(size) != b_file.read(size):
                return False
    return True


def build_header(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, int]:
    """Serialize a header for tensors written in the given order; returns the bytes to put before the data
    and the number of data bytes that must follow."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(raw)) + raw, offset
