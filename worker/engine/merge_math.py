"""The merge arithmetic, as pure functions of tensors: no files, no plan, no I/O.

Every weight is handled as a 2D view (shape[0], rest) in small blocks of rows, in fp32: a block stays in
the CPU cache through all of its steps, which on a memory-bound CPU is several times faster than running
each step over a whole tensor. DoRA needs the norm of each output unit: for the `rows` layout a unit is a
row and its norm comes from the block itself; for the `columns` layout (Conv1D, Embedding) a unit is a
column, and its norm is summed over all blocks in a first pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapter_merge.worker.engine.operations import Layout


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

    def add_delta(self, target: torch.Tensor, start: int) -> None:
        """target += rows [start, start + len(target)) of D = s·B@A (or its transpose), in place."""
        stop = start + target.shape[0]
        if self.layout == "rows":
            target.addmm_(self.b[start:stop], self.a, alpha=self.scale)
        else:
            target.addmm_(self.a[:, start:stop].T, self.b.T, alpha=self.scale)


def lowrank_change_squares(updates: list[LowRank]) -> float:
    """‖Σ sₖ·Bₖ@Aₖ‖² without forming the matrix: Σₖₗ sₖsₗ·tr((BₖᵀBₗ)(AₗAₖᵀ)), from rank-sized products only."""
    total = 0.0
    for first in updates:
        for second in updates:
            b_products = first.b.double().T @ second.b.double()
            a_products = second.a.double() @ first.a.double().T
            total += first.scale * second.scale * float(torch.trace(b_products @ a_products))
    return max(total, 0.0)


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """The 2D view every operation works on: (shape[0], rest); a vector is one row."""
    if tensor.dim() == 0:
        return tensor.reshape(1, 1)
    if tensor.dim() == 1:
        return tensor.reshape(1, -1)
    return tensor.reshape(tensor.shape[0], -1)


def accumulate_column_squares(total: torch.Tensor, base_block: torch.Tensor, update: LowRank, start: int) -> None:
    """Add one block's Σ(W₀ + D)² per column into `total` (float64, so summing many rows stays exact)."""
    merged = base_block.clone()
    update.add_delta(merged, start)
    total += merged.square().sum(dim=0, dtype=torch.float64)


def apply_update(current: torch.Tensor, base_block: torch.Tensor, update: LowRank, start: int) -> torch.Tensor:
    """current + D (LoRA) or (m/N)·(current + D) (DoRA), N the norm of W₀ + D per output unit.

    PEFT's rule for several adapters: each applies to the weight as merged so far, but a DoRA norm always
    uses the unmerged base plus that adapter's own delta. While `current` is still the base block itself,
    the update is made out of place (the base stays intact and W₀ + D is the result); later updates work in
    place. A zero norm is not checked here: it makes the block non-finite, which the caller detects.
    """
    if current is base_block:
        current = base_block.clone()
        update.add_delta(current, start)
        own = current
    else:
        update.add_delta(current, start)
        own = None
    if update.magnitude is None:
        return current
    if update.layout == "rows":
        if own is None:
            own = base_block.clone()
            update.add_delta(own, start)
        norms = torch.linalg.vector_norm(own, dim=1)
        current.mul_((update.magnitude[start : start + current.shape[0]] / norms).unsqueeze(1))
    else:
        assert update.column_norms is not None
        current.mul_((update.magnitude / update.column_norms).unsqueeze(0))
    return current


def has_zero_norm(base_block: torch.Tensor, update: LowRank, start: int) -> bool:
    """Whether this DoRA update divides by a zero norm in this block (to explain a non-finite result)."""
    if update.magnitude is None:
        return False
    if update.layout == "columns":
        assert update.column_norms is not None
        return bool((update.column_norms == 0).any())
    own = base_block.clone()
    update.add_delta(own, start)
    return bool((torch.linalg.vector_norm(own, dim=1) == 0).any())


def replace_rows(current: torch.Tensor, start: int, indices: torch.Tensor, rows: torch.Tensor) -> None:
    """Trainable tokens: overwrite the rows of this block whose index is listed."""
    inside = (indices >= start) & (indices < start + current.shape[0])
    if bool(inside.any()):
        current[indices[inside] - start] = rows[inside]


def rows_per_block(columns: int, target_elements: int) -> int:
    return max(1, target_elements // max(1, columns))
