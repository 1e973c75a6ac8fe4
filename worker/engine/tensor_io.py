"""Moving tensor bytes between files and torch: positional reads, raw chunks, legacy pickle adapters.

Reads use `os.preadv` into a buffer torch then views without a copy, so any thread may read any file and
a row block costs exactly its own bytes. A verbatim tensor is never converted or computed: its byte range
is read in pooled chunks (`ByteRange`s) that go as they are to the writer thread, which hashes and writes
them (the bytes pass through memory because the output's sha256 needs them anyway).
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from adapter_merge.worker.engine.adapter import legacy_tensor_infos
from adapter_merge.worker.engine.errors import InputError
from adapter_merge.worker.engine.input_files import InputFiles
from adapter_merge.worker.engine.tensor_info import PickledTensor, SafetensorsBytes, TensorInfo

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}


def legacy_state_dict(path: Path, input: int, files: InputFiles) -> dict[str, torch.Tensor]:
    """A legacy `adapter_model.bin`, loaded with `weights_only=True` so no pickled code can run, after the
    planner's checks of what it may allocate (`legacy_tensor_infos`) pass again on the very file loaded."""
    with files.open(path, input) as handle:
        legacy_tensor_infos(path, handle, input)
        handle.seek(0)
        try:
            state = torch.load(handle, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises pickle, zip and runtime errors alike for a bad file
            raise InputError(f"{path}: cannot load legacy adapter weights safely: {error}",
                             file=path, input=input) from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: legacy adapter weights are not a dict of tensors", file=path, input=input)
    return state


class BufferPool:
    """A few fixed-size byte buffers, reused: fresh multi-MB allocations would page-fault on every chunk."""

    def __init__(self, nbytes: int, count: int) -> None:
        self.nbytes = nbytes
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(count):
            self._free.put(torch.empty(nbytes, dtype=torch.uint8))

    def acquire(self, nbytes: int, timeout: float | None = None) -> tuple[torch.Tensor, Callable[[], None]]:
        """A buffer of exactly `nbytes` and the callback that returns it; oversized requests are not pooled.
        Raises `queue.Empty` if none is returned within `timeout` seconds (None: wait as long as it takes)."""
        if nbytes > self.nbytes:
            return torch.empty(nbytes, dtype=torch.uint8), no_release
        buffer = self._free.get(timeout=timeout)
        return buffer[:nbytes], lambda: self._free.put(buffer)


def no_release() -> None:
    """The release callback of a buffer that belongs to no pool."""


@dataclass(frozen=True)
class ByteRange:
    """Bytes [start, start + nbytes) of a tensor stored in a safetensors file: one chunk the merge reads."""

    info: TensorInfo
    start: int
    nbytes: int


def chunk_ranges(info: TensorInfo, chunk_bytes: int) -> list[ByteRange]:
    """A verbatim tensor's bytes as the chunks it is copied in."""
    return [ByteRange(info, start, min(chunk_bytes, info.nbytes - start))
            for start in range(0, info.nbytes, chunk_bytes)]


def rows_of(info: TensorInfo, buffer: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """The bytes in `buffer` as a (rows, columns) matrix of the tensor's stored dtype, without a copy."""
    return buffer.view(TORCH_DTYPES[info.dtype]).reshape(rows, columns)


class TensorReader:
    """Reads tensors (whole, or a range of rows) from the files of one merge; keeps files open until closed.
    Any thread may read."""

    def __init__(self, files: InputFiles) -> None:
        self.files = files
        self._open: dict[Path, BinaryIO] = {}
        self._opening = threading.Lock()
        self._legacy: dict[Path, dict[str, torch.Tensor]] = {}

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()
        self._legacy.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _fd(self, info: TensorInfo) -> int:
        with self._opening:
            if info.file not in self._open:
                self._open[info.file] = self.files.open(info.file, info.input)
            return self._open[info.file].fileno()

    def read(self, info: TensorInfo) -> torch.Tensor:
        return self.read_rows(info, 0, info.shape[0] if info.shape else 1)

    def read_rows(self, info: TensorInfo, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of the tensor's first dimension, in the stored dtype, into `buffer` if given
        (a pickled tensor is loaded whole, with its file, and sliced)."""
        match info.location:
            case PickledTensor(file=file):
                tensor = self._legacy_tensor(file, info)
                return tensor[start:stop] if tensor.dim() else tensor
            case SafetensorsBytes(offset=offset):
                row_bytes = info.nbytes // info.shape[0] if info.shape else info.nbytes
                nbytes = (stop - start) * row_bytes
                if buffer is None or buffer.numel() < nbytes:
                    buffer = torch.empty(nbytes, dtype=torch.uint8)
                buffer = buffer[:nbytes]
                self._read_exact(info, tensor_bytes(buffer), offset + start * row_bytes)
                shape = (stop - start, *info.shape[1:]) if info.shape else ()
                return buffer.view(TORCH_DTYPES[info.dtype]).reshape(shape)

    def read_range(self, chunk: ByteRange, buffer: torch.Tensor) -> None:
        """Fill `buffer` (exactly `chunk.nbytes` long) with the chunk's bytes."""
        location = chunk.info.location
        assert isinstance(location, SafetensorsBytes) and buffer.numel() == chunk.nbytes
        self._read_exact(chunk.info, tensor_bytes(buffer), location.offset + chunk.start)

    def _legacy_tensor(self, path: Path, info: TensorInfo) -> torch.Tensor:
        """The tensor from its legacy file (loaded whole, once), as planned: a file changed since is refused."""
        assert isinstance(info.input, int)
        if path not in self._legacy:
            self._legacy[path] = legacy_state_dict(path, info.input, self.files)
        tensor = self._legacy[path].get(info.name)
        if tensor is None or TORCH_DTYPES[info.dtype] != tensor.dtype or tuple(tensor.shape) != info.shape:
            raise InputError(f"{path}: tensor {info.name!r} is not the {info.dtype}{list(info.shape)} planned "
                             f"(was the file changed while merging?)", file=path, tensor=info.name, input=info.input)
        return tensor

    def _read_exact(self, info: TensorInfo, buffer: memoryview, offset: int) -> None:
        view = buffer
        fd = self._fd(info)
        while view:
            count = os.preadv(fd, [view], offset)
            if count == 0:
                raise InputError(f"{info.file}: file ended early (was it truncated while merging?)",
                                 file=info.file, tensor=info.name, input=info.input)
            view = view[count:]
            offset += count


def write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def copy_bytes(target: memoryview, source: memoryview) -> None:
    """target[:len(source)] = source, without holding the GIL while the bytes move.

    A memoryview slice assignment copies under the GIL: a megabyte holds it for ~0.1 ms, and the compute
    thread, whose steps on a block take about as long, waits for it at every return from torch. ctypes
    releases the GIL around its calls. A read-only source (a shard header: bytes) is small and copied as is."""
    if source.readonly or not source:
        target[: len(source)] = source
        return
    ctypes.memmove(_address(target), _address(source), len(source))


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor, without a copy; valid while `tensor` lives."""
    if tensor.numel() == 0:
        return memoryview(b"")
    assert tensor.is_contiguous() and tensor.device.type == "cpu"
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")
