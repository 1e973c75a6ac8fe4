"""Compute one changed output tensor, block by block: read the source rows, apply the plan's operations in
fp32, check the result, and round once to the output dtype."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from worker.engine.errors import NumericError
from worker.engine.merge_math import (
    LowRank,
    accumulate_column_squares,
    apply_update,
    as_matrix,
    replace_rows,
    rows_per_block,
)
from worker.engine.operations import BiasOp, LoraOp, Op, OutputTensor, TokenRowsOp
from worker.engine.safetensors_format import TensorInfo
from worker.engine.tensor_io import TORCH_DTYPES, TensorReader

BLOCK_ELEMENTS = 4 * 1024 * 1024
"""fp32 elements per row block (16 MiB): small enough to stay in cache-friendly, bounded memory."""


@dataclass
class ChangeStats:
    """Σ(out − W₀)² and ΣW₀² over a tensor, for the manifest's relative change."""

    change_squares: float = 0.0
    base_squares: float = 0.0

    @property
    def relative_change(self) -> float:
        return (self.change_squares / self.base_squares) ** 0.5 if self.base_squares else float("inf")


class TensorMerger:
    def __init__(self, reader: TensorReader, labels: dict[int, str], block_elements: int = BLOCK_ELEMENTS) -> None:
        self.reader = reader
        self.labels = labels
        """Adapter index -> how messages name it."""
        self.block_elements = block_elements

    def blocks(self, tensor: OutputTensor, stats: ChangeStats) -> Iterator[torch.Tensor]:
        """The output tensor as consecutive row blocks in the output dtype, flattened to 2D."""
        compute = torch.float64 if "F64" in (tensor.dtype, tensor.source.dtype) else torch.float32
        out_dtype = TORCH_DTYPES[tensor.dtype]
        updates = [self._prepare(op, compute) for op in tensor.ops]
        source_rows = tensor.shape[0] if tensor.shape else 1
        rows, columns = as_matrix(torch.empty(tensor.shape, device="meta")).shape
        step = rows_per_block(columns, self.block_elements)
        if source_rows != rows:  # a vector or scalar: one block of one row
            step = source_rows
        self._column_norms(tensor, updates, step, compute)
        for start in range(0, source_rows, step):
            stop = min(start + step, source_rows)
            base_block = as_matrix(self.reader.read_rows(tensor.source, start, stop)).to(compute)
            current = base_block.clone()
            for op, update in zip(tensor.ops, updates, strict=True):
                self._apply(tensor, op, update, current, base_block, start if rows == source_rows else 0)
            yield self._finish_block(tensor, current, base_block, out_dtype, stats, start)

    def _apply(self, tensor: OutputTensor, op: Op, update: object, current: torch.Tensor,
               base_block: torch.Tensor, start: int) -> None:
        if isinstance(op, LoraOp):
            assert isinstance(update, LowRank)
            if not apply_update(current, base_block, update, start):
                raise NumericError(
                    f"tensor {tensor.name!r}: DoRA weight norm is zero in {self.labels[op.adapter]} "
                    f"(module {op.module!r}); the merge would divide by zero"
                )
        elif isinstance(op, BiasOp):
            assert isinstance(update, torch.Tensor)
            current += update.reshape(1, -1) * op.scale
        else:
            assert isinstance(update, tuple)
            replace_rows(current, start, *update)

    def _finish_block(self, tensor: OutputTensor, current: torch.Tensor, base_block: torch.Tensor,
                      out_dtype: torch.dtype, stats: ChangeStats, start: int) -> torch.Tensor:
        if not bool(torch.isfinite(current).all()):
            raise NumericError(f"tensor {tensor.name!r}: merged values are not finite (row block from {start})")
        rounded = current.to(out_dtype)
        if out_dtype != current.dtype and not bool(torch.isfinite(rounded).all()):
            largest = float(current.abs().max())
            raise NumericError(
                f"tensor {tensor.name!r}: merged value {largest:.6g} overflows {tensor.dtype}; "
                "choose a wider output dtype"
            )
        change = rounded.to(current.dtype) - base_block
        stats.change_squares += float(change.square().sum(dtype=torch.float64))
        stats.base_squares += float(base_block.square().sum(dtype=torch.float64))
        return rounded

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

    def _column_norms(self, tensor: OutputTensor, updates: list[object], step: int, compute: torch.dtype) -> None:
        """First pass for DoRA in the columns layout: the norm of each column needs every row."""
        pending = [u for u in updates if isinstance(u, LowRank) and u.magnitude is not None and u.layout == "columns"]
        if not pending:
            return
        rows, columns = as_matrix(torch.empty(tensor.shape, device="meta")).shape
        totals = [torch.zeros(columns, dtype=torch.float64) for _ in pending]
        for start in range(0, rows, step):
            base_block = as_matrix(self.reader.read_rows(tensor.source, start, min(start + step, rows))).to(compute)
            for total, update in zip(totals, pending, strict=True):
                accumulate_column_squares(total, base_block, update, start)
        for total, update in zip(totals, pending, strict=True):
            update.column_norms = total.sqrt().to(compute)
