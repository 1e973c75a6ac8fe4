"""The safetensors container, read and written without torch.

Reading parses and validates the header only (tensor data stays on disk, read later by offset), so that a
corrupt file is reported by name before any output exists and so that the API can preflight without torch.
Writing builds the header up front from names, dtypes and shapes: a shard's layout is fixed before its
first tensor is computed, which is what lets the engine stream tensors straight into place.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from adapter_merge.worker.engine.errors import InputError

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
FP8_DTYPES = frozenset({"F8_E5M2", "F8_E4M3"})
MAX_HEADER_BYTES = 100 * 1024 * 1024
HEADER_ALIGNMENT = 8


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: `offset` is absolute within `file`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsFile:
    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    """In file order (by data offset)."""


def _corrupt(path: Path, detail: str) -> InputError:
    return InputError(f"{path}: not a valid safetensors file: {detail}")


def read_header(path: Path) -> SafetensorsFile:
    """Parse and validate a safetensors header; every offset is checked against the real file size."""
    try:
        file_size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"file is {file_size} bytes, too short for the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, file_size - 8):
                raise _corrupt(path, f"header length {header_len} exceeds the file size {file_size}")
            raw_header = handle.read(header_len)
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror}") from error
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _corrupt(path, f"header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_size = file_size - data_start
    tensors = [_parse_entry(path, name, entry, data_start, data_size) for name, entry in header.items()]
    tensors.sort(key=lambda info: info.offset)
    _check_contiguous(path, tensors, data_start, data_size)
    return SafetensorsFile(path=path, metadata=metadata, tensors={info.name: info for info in tensors})


def _parse_entry(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _corrupt(path, f"entry for tensor {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise _corrupt(path, f"tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _corrupt(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if end > data_size:
        raise _corrupt(path, f"tensor {name!r} ends at byte {end}, past the end of the data ({data_size} bytes)")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise _corrupt(path, f"tensor {name!r} spans {end - begin} bytes but {dtype}{shape} needs {expected}")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, end - begin)


def _check_contiguous(path: Path, tensors: list[TensorInfo], data_start: int, data_size: int) -> None:
    position = data_start
    for info in tensors:
        if info.offset != position:
            problem = "overlaps the previous tensor" if info.offset < position else "leaves a gap before it"
            raise _corrupt(path, f"tensor {info.name!r} {problem}")
        position += info.nbytes
    if position != data_start + data_size:
        raise _corrupt(path, f"{data_start + data_size - position} bytes after the last tensor")


COMPARE_CHUNK_BYTES = 8 * 1024 * 1024


def same_bytes(first: TensorInfo, second: TensorInfo) -> bool:
    """Whether two stored tensors are identical (dtype, shape and every byte); legacy pickles never are."""
    if (first.dtype, first.shape) != (second.dtype, second.shape) or first.offset < 0 or second.offset < 0:
        return False
    with first.file.open("rb") as a, second.file.open("rb") as b:
        a.seek(first.offset)
        b.seek(second.offset)
        for start in range(0, first.nbytes, COMPARE_CHUNK_BYTES):
            size = min(COMPARE_CHUNK_BYTES, first.nbytes - start)
            if a.read(size) != b.read(size):
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
