"""The merge arithmetic, as pure functions of tensors: no files, no plan, no I/O.

Every weight is handled as a 2D view (shape[0], rest) and in blocks of rows, in fp32, so that the working
set is a few blocks rather than a few copies of the whole tensor. DoRA needs the norm of each output unit:
for the `rows` layout a unit is a row and its norm comes from the block itself; for the `columns` layout
(Conv1D, Embedding) a unit is a column and its norm is summed over all blocks in a first pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.operations import Layout


@dataclass
class LowRank:
    """One LoRA/DoRA update with its tensors loaded in fp32 and flattened to 2D."""

    a: torch.Tensor
    """(r, cols) for the rows layout, (r, rows) for the columns layout."""
    b: torch.Tensor
    """(rows, r) for the rows layout, (cols, r) for the columns layout."""
    scale: float
    layout: Layout
    magnitude: torch.Tensor | None = None
    """DoRA magnitude per output unit, flat."""
    column_norms: torch.Tensor | None = None
    """For DoRA in the columns layout: ‖W₀ + D‖ per column, from `accumulate_column_squares`."""

    def delta(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of D in the stored layout."""
        if self.layout == "rows":
            product = self.b[start:stop] @ self.a
        else:
            product = self.a[:, start:stop].T @ self.b.T
        return product.mul_(self.scale)


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """The 2D view every operation works on: (shape[0], rest); a vector is one row."""
    if tensor.dim() == 0:
        return tensor.reshape(1, 1)
    if tensor.dim() == 1:
        return tensor.reshape(1, -1)
    return tensor.reshape(tensor.shape[0], -1)


def accumulate_column_squares(total: torch.Tensor, base_block: torch.Tensor, update: LowRank, start: int) -> None:
    """Add one block's Σ(W₀ + D)² per column into `total` (float64, so summing thousands of rows stays exact)."""
    merged = base_block + update.delta(start, start + base_block.shape[0])
    total += merged.square().sum(dim=0, dtype=torch.float64)


def dora_factor(update: LowRank, base_block: torch.Tensor, delta: torch.Tensor, start: int) -> torch.Tensor | None:
    """m / ‖W₀ + D‖, shaped to broadcast over the block; None where a norm is zero (DoRA would divide by it)."""
    assert update.magnitude is not None
    if update.layout == "rows":
        norms = torch.linalg.vector_norm(base_block + delta, dim=1)
        magnitude = update.magnitude[start : start + base_block.shape[0]]
        shape = (-1, 1)
    else:
        assert update.column_norms is not None
        norms, magnitude, shape = update.column_norms, update.magnitude, (1, -1)
    if bool((norms == 0).any()):
        return None
    return (magnitude / norms).reshape(shape)


def apply_update(current: torch.Tensor, base_block: torch.Tensor, update: LowRank, start: int) -> bool:
    """current ← current + D (LoRA) or (m/N)·(current + D) (DoRA, N from the unmerged base); False on a zero norm.

    PEFT's rule for several adapters: each applies to the weight as merged so far, but a DoRA norm always
    uses the unmerged base plus that adapter's own delta.
    """
    delta = update.delta(start, start + current.shape[0])
    current += delta
    if update.magnitude is None:
        return True
    factor = dora_factor(update, base_block, delta, start)
    if factor is None:
        return False
    current *= factor
    return True


def replace_rows(current: torch.Tensor, start: int, indices: torch.Tensor, rows: torch.Tensor) -> None:
    """Trainable tokens: overwrite the rows of this block whose index is listed."""
    inside = (indices >= start) & (indices < start + current.shape[0])
    if bool(inside.any()):
        current[indices[inside] - start] = rows[inside]


def rows_per_block(columns: int, target_elements: int) -> int:
    return max(1, target_elements // max(1, columns))
