"""What happens to one output tensor: its starting value and the adapter operations applied in order.

Plain data (tensor locations and numbers), so planning stays torch-free and the math stays file-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from adapter_merge.worker.engine.safetensors_format import DTYPE_SIZES, TensorInfo

Layout = Literal["rows", "columns"]
"""How a low-rank delta lies in the stored weight, viewed as 2D (shape[0], rest):
rows: D = s·B@A with A (r, cols), B (rows, r) — Linear and ConvNd, one output unit per row;
columns: D = s·(B@A)ᵀ with A (r, rows), B (cols, r) — GPT-2 Conv1D and Embedding, one output unit per column."""


@dataclass(frozen=True)
class LoraOp:
    """A LoRA delta, or a DoRA update when `magnitude` is set."""

    adapter: int
    module: str
    layout: Layout
    lora_a: TensorInfo
    lora_b: TensorInfo
    scale: float
    magnitude: TensorInfo | None = None


@dataclass(frozen=True)
class BiasOp:
    """`lora_bias`: the bias gains s·lora_B.bias."""

    adapter: int
    lora_bias: TensorInfo
    scale: float


@dataclass(frozen=True)
class TokenRowsOp:
    """Trainable tokens: whole embedding rows replaced by stored values."""

    adapter: int
    rows: TensorInfo
    indices: tuple[int, ...]


Op = LoraOp | BiasOp | TokenRowsOp


@dataclass
class OutputTensor:
    name: str
    source: TensorInfo
    """The base tensor, or the adapter tensor that replaces it (modules_to_save, saved base_layer)."""
    dtype: str
    ops: list[Op] = field(default_factory=list)
    shard: str = ""
    replaced: bool = False
    """The starting value comes from an adapter (or, for an untied head, from the shared embedding)."""

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def nbytes(self) -> int:
        return self.source.numel * DTYPE_SIZES[self.dtype]

    @property
    def changed(self) -> bool:
        return bool(self.ops) or self.replaced

    @property
    def verbatim(self) -> bool:
        """Copied byte for byte: nothing to compute, same dtype, and the source lies in a safetensors file."""
        return not self.ops and self.dtype == self.source.dtype and self.source.offset >= 0
