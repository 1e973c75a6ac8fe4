"""Compute one changed output tensor: read its source a chunk of rows at a time, apply the plan's operations
to cache-sized blocks in fp32, check them, and round each block once into the output chunk."""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from adapter_merge.worker.engine.block_merge import BlockMerge, ChangeStats
from adapter_merge.worker.engine.errors import NumericError
from adapter_merge.worker.engine.loaded_ops import AdapterTensors, DoraByColumns, LoadedOp, load_op
from adapter_merge.worker.engine.merge_math import as_matrix, rows_per_block
from adapter_merge.worker.engine.operations import OutputTensor
from adapter_merge.worker.engine.read_ahead import Chunk, ReadAhead
from adapter_merge.worker.engine.tensor_info import SafetensorsBytes, TensorInfo
from adapter_merge.worker.engine.tensor_io import (
    TORCH_DTYPES,
    BufferPool,
    ByteRange,
    TensorReader,
    no_release,
    rows_of,
)

BLOCK_ELEMENTS = 512 * 1024
"""fp32 elements a block works on (2 MiB): a block's steps then run in the CPU's caches, and the calls into torch
per byte stay few. On the 1.1B merges (6 interleaved runs each), 2 MiB blocks made DoRA 0.2 s faster than 1 MiB
ones (3.38 against 3.59 s) and LoRA no slower, and 4 MiB blocks were slower for DoRA; 1 MiB blocks had taken
~12% less CPU time than 256 KiB ones. All of it provided the allocator keeps its memory (`keep_heap`)."""
HEAP_KEPT_BYTES = 256 * 1024 * 1024
"""Freed heap memory glibc keeps for reuse instead of returning it to the system."""
MMAP_THRESHOLD_BYTES = 64 * 1024 * 1024
"""Allocations from this size up get pages of their own (glibc's mmap threshold)."""
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc's mallopt parameter numbers (malloc.h)."""
CHUNK_BYTES = 16 * 1024 * 1024
"""Bytes read or written per chunk: large enough for efficient I/O, small enough to bound memory."""

# The smallest magnitude that rounds to infinity in each output dtype narrower than the compute dtype
# (max finite + half an ulp; float32 when computing in float64).
OVERFLOW_AT = {torch.float16: 65520.0, torch.bfloat16: (2 - 2**-8) * 2.0**127, torch.float32: (2 - 2**-24) * 2.0**127}


def keep_heap() -> None:
    """Make glibc keep freed heap memory for the next block's temporaries instead of unmapping it.

    By default a block's 2 MiB temporaries are each freed back to the system and their pages faulted in again
    for the next block: 3x the page faults of the whole merge (perf stat: 65k -> 180-300k), and on a VM whose
    freed memory goes back to the host every fault is slow. With these settings the faults stay at 65k. The
    settings are the process's (glibc has no per-thread ones); where mallopt is missing nothing changes."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_TRIM_THRESHOLD, HEAP_KEPT_BYTES)
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


@dataclass(frozen=True)
class RowChunks:
    """How a changed tensor is computed: its (rows, columns) matrix view, a chunk of rows at a time."""

    rows: int
    columns: int
    bounds: list[tuple[int, int]]
    """[start, stop) rows of each chunk, in order."""

    @staticmethod
    def of(tensor: OutputTensor) -> RowChunks:
        rows, columns = as_matrix(torch.empty(tensor.shape, device="meta")).shape
        widest = max(TORCH_DTYPES[tensor.dtype].itemsize, TORCH_DTYPES[tensor.source.dtype].itemsize)
        step = rows_per_block(columns * widest, CHUNK_BYTES)
        return RowChunks(rows, columns, [(start, min(start + step, rows)) for start in range(0, rows, step)])


def source_ranges(tensor: OutputTensor) -> list[ByteRange]:
    """The reads a changed tensor's chunks make of its source, in order: what a `ReadAhead` may do first. Empty
    for a source in a legacy pickle, which only loads whole, or without rows."""
    chunks = RowChunks.of(tensor)
    if not isinstance(tensor.source.location, SafetensorsBytes) or not chunks.rows:
        return []
    row_bytes = tensor.source.nbytes // chunks.rows
    return [ByteRange(tensor.source, start * row_bytes, (stop - start) * row_bytes) for start, stop in chunks.bounds]


class TensorMerger:
    """Computes the changed output tensors of one merge, reusing its reader, buffers and staging memory."""

    def __init__(self, reader: TensorReader, labels: dict[int, str], pool: BufferPool,
                 read_ahead: ReadAhead | None = None) -> None:
        keep_heap()
        self.reader = reader
        self.labels = labels
        """Adapter index -> how messages name it."""
        self.pool = pool
        self.read_ahead = read_ahead
        """Where the source chunks of `source_ranges` come from, already read; None: read them here."""
        self._staging: torch.Tensor | None = None
        """Source rows read here are read into this buffer, reused so its pages are touched only once."""

    def chunks(self, tensor: OutputTensor, stats: ChangeStats) -> Iterator[tuple[torch.Tensor, Callable[[], None]]]:
        """The output tensor as consecutive chunks of rows in the output dtype, each in a pooled buffer
        that the callback returns once the chunk is written."""
        compute = torch.float64 if "F64" in (tensor.dtype, tensor.source.dtype) else torch.float32
        out_dtype = TORCH_DTYPES[tensor.dtype]
        adapter_tensors = AdapterTensors(self.reader, self.labels, compute)
        ops = [load_op(op, adapter_tensors) for op in tensor.ops]
        layout = RowChunks.of(tensor)
        rows, columns = layout.rows, layout.columns
        self._column_pass(tensor, ops, rows, columns, compute)
        block_merge = BlockMerge.of(tensor, ops, stats)
        safe_peak = OVERFLOW_AT.get(out_dtype, math.inf) / 2  # a wide margin for the rounding in any bound
        block = rows_per_block(columns, BLOCK_ELEMENTS)
        sources = self._sources(tensor, layout)
        for (chunk_start, chunk_stop), (source, done) in zip(layout.bounds, sources, strict=True):
            buffer, release = self.pool.acquire((chunk_stop - chunk_start) * columns * out_dtype.itemsize)
            out = buffer.view(out_dtype).reshape(chunk_stop - chunk_start, columns)
            for offset in range(0, chunk_stop - chunk_start, block):
                end = min(offset + block, chunk_stop - chunk_start)
                start = chunk_start + offset
                base_block = source[offset:end].to(compute, copy=True)  # ours to modify: never the source rows
                merged = block_merge.merge(base_block, start)
                written = out[offset:end]
                written.copy_(merged)
                if not block_merge.peak() < safe_peak:
                    self._check(tensor, ops, written, merged, source[offset:end], start)
            done()
            yield out, release
        block_merge.finish()

    def _sources(self, tensor: OutputTensor, layout: RowChunks) -> Iterator[Chunk]:
        """Each chunk's source rows as a matrix, with the callback to run once it has been used."""
        ranges = source_ranges(tensor) if self.read_ahead is not None else []
        if ranges:
            assert self.read_ahead is not None
            for (start, stop), chunk_range in zip(layout.bounds, ranges, strict=True):
                buffer, done = self.read_ahead.take(chunk_range)
                yield rows_of(tensor.source, buffer, stop - start, layout.columns), done
            return
        for start, stop in layout.bounds:
            yield as_matrix(self._read_rows(tensor.source, start, stop, layout.rows)), no_release

    def _read_rows(self, info: TensorInfo, start: int, stop: int, rows: int) -> torch.Tensor:
        if self._staging is None:
            self._staging = torch.empty(CHUNK_BYTES, dtype=torch.uint8)
        if info.shape and rows == info.shape[0]:
            return self.reader.read_rows(info, start, stop, self._staging)
        return self.reader.read(info)  # a vector or scalar is a single row

    def _column_pass(self, tensor: OutputTensor, ops: list[LoadedOp], rows: int, columns: int,
                     compute: torch.dtype) -> None:
        """First pass for DoRA in the columns layout: the norm of each column needs every row."""
        pending = [op for op in ops if isinstance(op, DoraByColumns)]
        if not pending:
            return
        step = rows_per_block(columns * TORCH_DTYPES[tensor.source.dtype].itemsize, CHUNK_BYTES)
        for start in range(0, rows, step):
            source = as_matrix(self._read_rows(tensor.source, start, min(start + step, rows), rows)).to(compute)
            for op in pending:
                op.add_column_squares(source, start)

    def _check(self, tensor: OutputTensor, ops: list[LoadedOp], written: torch.Tensor, merged: torch.Tensor,
               source_rows: torch.Tensor, start: int) -> None:
        """NaN, inf and overflow are errors. The block as written is finite when its sum is, which one pass over
        the 16-bit values finds in half the time of a min/max of the fp32 block (15 against 31 us per MiB of
        fp32); only a sum that is not finite (or that overflows by itself) sends the merged values through the
        check that says why."""
        if math.isfinite(float(written.sum())):
            return
        low, high = (float(v) for v in torch.aminmax(merged))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise self._non_finite_error(tensor, ops, source_rows.to(merged.dtype), start)
        largest = max(-low, high)
        if largest >= OVERFLOW_AT.get(written.dtype, math.inf):
            raise NumericError(f"tensor {tensor.name!r}: merged value {largest:.6g} overflows "
                               f"{tensor.dtype}; choose a wider output dtype", tensor=tensor.name, option="dtype")

    @staticmethod
    def _non_finite_error(tensor: OutputTensor, ops: list[LoadedOp], base_block: torch.Tensor,
                          start: int) -> NumericError:
        """Why a block is not finite: a DoRA norm of zero, a starting value that already was not, or else
        the operations' values (then the one adapter that applied them, if there is only one)."""
        for op in ops:
            if (error := op.zero_norm_error(tensor.name, base_block, start)) is not None:
                return error
        message = f"tensor {tensor.name!r}: merged values are not finite (row block from {start})"
        if not bool(torch.isfinite(base_block).all()):
            return NumericError(message, file=tensor.source.file, tensor=tensor.name, input=tensor.source.input)
        adapters = {op.adapter for op in tensor.ops}
        return NumericError(message, tensor=tensor.name, input=adapters.pop() if len(adapters) == 1 else None)
