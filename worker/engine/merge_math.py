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


@dataclass(frozen=True)
class LowRank:
    """A low-rank delta D = s·B@A (rows layout) or its transpose (columns layout), factors in fp32, 2D."""

    a: torch.Tensor
    """(r, cols) for the rows layout, (r, rows) for the columns layout."""
    b: torch.Tensor
    """(rows, r) for the rows layout, (cols, r) for the columns layout."""
    scale: float
    layout: Layout


def add_delta(target: torch.Tensor, delta: LowRank, start: int) -> None:
    """target += rows [start, start + len(target)) of D, in place."""
    stop = start + target.shape[0]
    if delta.layout == "rows":
        target.addmm_(delta.b[start:stop], delta.a, alpha=delta.scale)
    else:
        target.addmm_(delta.a[:, start:stop].T, delta.b.T, alpha=delta.scale)


def base_plus_delta(base_block: torch.Tensor, delta: LowRank, start: int) -> torch.Tensor:
    """W₀ + D for this block, in a new tensor: the base block is never modified."""
    merged = base_block.clone()
    add_delta(merged, delta, start)
    return merged


def with_delta(current: torch.Tensor, base_block: torch.Tensor, delta: LowRank, start: int) -> torch.Tensor:
    """current + D: out of place while `current` is still the base block itself, in place after that.

    PEFT's rule for several adapters: each applies to the weight as merged so far."""
    if current is base_block:
        return base_plus_delta(base_block, delta, start)
    add_delta(current, delta, start)
    return current


def lowrank_change_squares(deltas: list[LowRank]) -> float:
    """‖Σ sₖ·Bₖ@Aₖ‖² without forming the matrix: Σₖₗ sₖsₗ·tr((BₖᵀBₗ)(AₗAₖᵀ)), from rank-sized products only."""
    total = 0.0
    for first in deltas:
        for second in deltas:
            b_products = first.b.double().T @ second.b.double()
            a_products = second.a.double() @ first.a.double().T
            total += first.scale * second.scale * float(torch.trace(b_products @ a_products))
    return max(total, 0.0)


def lowrank_peak(delta: LowRank) -> float:
    """An upper bound on |D| over every element, from the factors (Cauchy-Schwarz on each element's sum over
    the rank): |s| · the largest norm of a row of B · the largest norm of a column of A."""
    b_rows = torch.linalg.vector_norm(delta.b.double(), dim=1)
    a_columns = torch.linalg.vector_norm(delta.a.double(), dim=0)
    if not b_rows.numel() or not a_columns.numel():
        return 0.0
    return abs(delta.scale) * float(b_rows.max()) * float(a_columns.max())


def lowrank_row_squares(delta: LowRank) -> torch.Tensor:
    """‖Dᵢ‖² of every row of a rows-layout delta, in float64, from its factors alone: s²·bᵢ(AAᵀ)bᵢᵀ."""
    b, a = delta.b.double(), delta.a.double()
    return delta.scale**2 * ((b @ (a @ a.T)) * b).sum(dim=1)


def row_dots_with_delta(projections: torch.Tensor, delta: LowRank) -> torch.Tensor:
    """⟨Wᵢ, Dᵢ⟩ of every row, in float64, from the rows' products with the delta's A (W·Aᵀ, rows by rank)
    without forming D: s·Σₖ bᵢₖ(W·Aᵀ)ᵢₖ."""
    return delta.scale * (projections.double() * delta.b.double()).sum(dim=1)


def rescaled_change_squares(base_squares: torch.Tensor, dots: torch.Tensor, delta_squares: torch.Tensor,
                            factors: torch.Tensor) -> float:
    """Σᵢ‖cᵢ(W₀ᵢ + Dᵢ) - W₀ᵢ‖² from each row's ‖W₀ᵢ‖², ⟨W₀ᵢ,Dᵢ⟩, ‖Dᵢ‖² and factor cᵢ (float64 vectors):
    (cᵢ-1)²‖W₀ᵢ‖² + 2cᵢ(cᵢ-1)⟨W₀ᵢ,Dᵢ⟩ + cᵢ²‖Dᵢ‖². ⟨W₀ᵢ,Dᵢ⟩ is computed, not recovered as ‖W₀ᵢ+Dᵢ‖² minus the
    other two: that difference of near-equal numbers would cost its error of ~1e-7·‖W₀ᵢ‖² over a change that
    may be a thousand times smaller."""
    less_one = factors - 1
    squares = less_one.square() * base_squares + 2 * factors * less_one * dots + factors.square() * delta_squares
    return float(squares.sum().clamp(min=0))


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """The 2D view every operation works on: (shape[0], rest); a vector is one row."""
    if tensor.dim() == 0:
        return tensor.reshape(1, 1)
    if tensor.dim() == 1:
        return tensor.reshape(1, -1)
    return tensor.reshape(tensor.shape[0], -1)


def row_norms(merged: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """‖W₀ + D‖ of each row of a block: DoRA's norm in the rows layout (into `out` when given)."""
    return torch.linalg.vector_norm(merged, dim=1, out=out)


def column_squares(base_block: torch.Tensor, delta: LowRank, start: int) -> torch.Tensor:
    """One block's Σ(W₀ + D)² per column, in float64 so that summing many blocks stays exact."""
    return base_plus_delta(base_block, delta, start).square().sum(dim=0, dtype=torch.float64)


def rescale_rows(current: torch.Tensor, magnitude: torch.Tensor, norms: torch.Tensor,
                 factors: torch.Tensor | None = None) -> None:
    """DoRA in the rows layout: row i times cᵢ = mᵢ/Nᵢ, in place (`magnitude` and `norms` for this block's
    rows); `factors`, when given, receives the cᵢ.

    A zero norm is not checked here: it makes the block non-finite, which the caller detects."""
    current.mul_(torch.div(magnitude, norms, out=factors).unsqueeze(1))


def rescale_columns(current: torch.Tensor, magnitude: torch.Tensor, norms: torch.Tensor) -> None:
    """DoRA in the columns layout: column j times mⱼ/Nⱼ, in place."""
    current.mul_((magnitude / norms).unsqueeze(0))


def add_bias(current: torch.Tensor, bias: torch.Tensor, scale: float) -> None:
    """`lora_bias`: every row (a bias is one row) gains s·bias, in place."""
    current.add_(bias.reshape(1, -1), alpha=scale)


def replace_rows(current: torch.Tensor, start: int, indices: torch.Tensor, rows: torch.Tensor) -> None:
    """Trainable tokens: overwrite the rows of this block whose index is listed."""
    inside = (indices >= start) & (indices < start + current.shape[0])
    if bool(inside.any()):
        current[indices[inside] - start] = rows[inside]


def rows_per_block(columns: int, target_elements: int) -> int:
    return max(1, target_elements // max(1, columns))
