"""Compute one changed output tensor: read its source a chunk of rows at a time, apply the plan's operations
to cache-sized blocks in fp32, check them, and round each block once into the output chunk."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from adapter_merge.worker.engine.errors import NumericError
from adapter_merge.worker.engine.merge_math import (
    LowRank,
    accumulate_column_squares,
    apply_update,
    as_matrix,
    has_zero_norm,
    lowrank_change_squares,
    replace_rows,
    rows_per_block,
)
from adapter_merge.worker.engine.operations import BiasOp, LoraOp, Op, OutputTensor, TokenRowsOp
from adapter_merge.worker.engine.safetensors_format import TensorInfo
from adapter_merge.worker.engine.tensor_io import TORCH_DTYPES, BufferPool, TensorReader

BLOCK_ELEMENTS = 64 * 1024
"""fp32 elements a block works on (256 KiB): all of a block's steps then run in the CPU's cache."""
CHUNK_BYTES = 16 * 1024 * 1024
"""Bytes read or written per chunk: large enough for efficient I/O, small enough to bound memory."""

# The smallest magnitude that rounds to infinity in each 16-bit dtype (max finite + half an ulp).
OVERFLOW_AT = {torch.float16: 65520.0, torch.bfloat16: (2 - 2**-8) * 2.0**127}


@dataclass
class ChangeStats:
    """Σ(W - W₀)² and ΣW₀² over a tensor (before rounding), for the manifest's relative change."""

    change_squares: float = 0.0
    base_squares: float = 0.0

    @property
    def relative_change(self) -> float:
        return math.sqrt(self.change_squares / self.base_squares) if self.base_squares else float("inf")


class TensorMerger:
    def __init__(self, reader: TensorReader, labels: dict[int, str], pool: BufferPool) -> None:
        self.reader = reader
        self.labels = labels
        """Adapter index -> how messages name it."""
        self.pool = pool
        self._staging = torch.empty(CHUNK_BYTES, dtype=torch.uint8)
        """Source rows are read here, one chunk at a time; reused so its pages are touched only once."""

    def chunks(self, tensor: OutputTensor, stats: ChangeStats) -> Iterator[tuple[torch.Tensor, Callable[[], None]]]:
        """The output tensor as consecutive chunks of rows in the output dtype, each in a pooled buffer
        that the callback returns once the chunk is written."""
        compute = torch.float64 if "F64" in (tensor.dtype, tensor.source.dtype) else torch.float32
        out_dtype = TORCH_DTYPES[tensor.dtype]
        updates = [self._prepare(op, compute) for op in tensor.ops]
        rows, columns = as_matrix(torch.empty(tensor.shape, device="meta")).shape
        self._column_norms(tensor, updates, rows, columns, compute)
        # Plain LoRA on an unreplaced tensor: ‖ΣD‖ comes in closed form from the factors; anything else
        # that changes the tensor is measured block by block.
        closed_form = (
            bool(tensor.ops) and not tensor.replaced
            and all(isinstance(u, LowRank) and u.magnitude is None for u in updates)
        )
        if closed_form:
            stats.change_squares = lowrank_change_squares(updates)  # type: ignore[arg-type]
        measure_change = tensor.changed and not closed_form
        block = rows_per_block(columns, BLOCK_ELEMENTS)
        widest = max(out_dtype.itemsize, TORCH_DTYPES[tensor.source.dtype].itemsize)
        chunk_rows = rows_per_block(columns * widest, CHUNK_BYTES)
        for chunk_start in range(0, rows, chunk_rows):
            chunk_stop = min(chunk_start + chunk_rows, rows)
            source = as_matrix(self._read_rows(tensor.source, chunk_start, chunk_stop, rows))
            buffer, release = self.pool.acquire((chunk_stop - chunk_start) * columns * out_dtype.itemsize)
            out = buffer.view(out_dtype).reshape(chunk_stop - chunk_start, columns)
            for offset in range(0, chunk_stop - chunk_start, block):
                end = min(offset + block, chunk_stop - chunk_start)
                start = chunk_start + offset
                base_block = source[offset:end].to(compute)
                base_flat = base_block.reshape(-1)
                stats.base_squares += float(torch.dot(base_flat, base_flat))
                current = self._merge_block(tensor, updates, base_block, start)
                self._check(tensor, updates, current, base_block, out_dtype, start)
                if measure_change:
                    stats.change_squares += float(torch.dist(current, base_block)) ** 2
                out[offset:end].copy_(current)
            yield out, release

    def _read_rows(self, info: TensorInfo, start: int, stop: int, rows: int) -> torch.Tensor:
        if info.shape and rows == info.shape[0]:
            return self.reader.read_rows(info, start, stop, self._staging)
        return self.reader.read(info)  # a vector or scalar is a single row

    def _merge_block(self, tensor: OutputTensor, updates: list[object], base_block: torch.Tensor,
                     start: int) -> torch.Tensor:
        """The block with every operation applied; `base_block` itself is never modified."""
        current = base_block
        for op, update in zip(tensor.ops, updates, strict=True):
            if isinstance(update, LowRank):
                current = apply_update(current, base_block, update, start)
                continue
            if current is base_block:
                current = base_block.clone()
            if isinstance(op, BiasOp):
                assert isinstance(update, torch.Tensor)
                current.add_(update.reshape(1, -1), alpha=op.scale)
            else:
                assert isinstance(update, tuple)
                replace_rows(current, start, *update)
        return current

    def _check(self, tensor: OutputTensor, updates: list[object], current: torch.Tensor,
               base_block: torch.Tensor, out_dtype: torch.dtype, start: int) -> None:
        """NaN, inf and 16-bit overflow are errors; one min/max reduction finds all three."""
        if current.numel() == 0:
            return
        low, high = (float(v) for v in torch.aminmax(current))
        if not (math.isfinite(low) and math.isfinite(high)):
            for op, update in zip(tensor.ops, updates, strict=True):
                if isinstance(update, LowRank) and has_zero_norm(base_block, update, start):
                    assert isinstance(op, LoraOp)
                    raise NumericError(
                        f"tensor {tensor.name!r}: DoRA weight norm is zero in {self.labels[op.adapter]} "
                        f"(module {op.module!r}); the merge would divide by zero"
                    )
            raise NumericError(f"tensor {tensor.name!r}: merged values are not finite (row block from {start})")
        largest = max(-low, high)
        if largest >= OVERFLOW_AT.get(out_dtype, math.inf):
            raise NumericError(f"tensor {tensor.name!r}: merged value {largest:.6g} overflows "
                               f"{tensor.dtype}; choose a wider output dtype")

    def _prepare(self, op: Op, compute: torch.dtype) -> object:
        """Load an operation's adapter tensors once per output tensor, checked for NaN/inf."""
        if isinstance(op, LoraOp):
            return LowRank(
                a=self._load(op.adapter, op.lora_a, compute).reshape(op.lora_a.shape[0], -1),
                b=self._load(op.adapter, op.lora_b, compute).reshape(op.lora_b.shape[0], -1),
                scale=op.scale,
                layout=op.layout,
                magnitude=None if op.magnitude is None else self._load(op.adapter, op.magnitude, compute).reshape(-1),
            )
        if isinstance(op, BiasOp):
            return self._load(op.adapter, op.lora_bias, compute)
        assert isinstance(op, TokenRowsOp)
        return torch.tensor(op.indices, dtype=torch.long), self._load(op.adapter, op.rows, compute)

    def _load(self, adapter: int, info: TensorInfo, compute: torch.dtype) -> torch.Tensor:
        tensor = self.reader.read(info).to(compute)
        if not bool(torch.isfinite(tensor).all()):
            raise NumericError(f"{info.file}: tensor {info.name!r} of {self.labels[adapter]} contains NaN or inf")
        return tensor

    def _column_norms(self, tensor: OutputTensor, updates: list[object], rows: int, columns: int,
                      compute: torch.dtype) -> None:
        """First pass for DoRA in the columns layout: the norm of each column needs every row."""
        pending = [u for u in updates if isinstance(u, LowRank) and u.magnitude is not None and u.layout == "columns"]
        if not pending:
            return
        totals = [torch.zeros(columns, dtype=torch.float64) for _ in pending]
        step = rows_per_block(columns * TORCH_DTYPES[tensor.source.dtype].itemsize, CHUNK_BYTES)
        for start in range(0, rows, step):
            source = as_matrix(self._read_rows(tensor.source, start, min(start + step, rows), rows)).to(compute)
            for total, update in zip(totals, pending, strict=True):
                accumulate_column_squares(total, source, update, start)
        for total, update in zip(totals, pending, strict=True):
            update.column_norms = total.sqrt().to(compute)
