"""What happens to one output tensor: its starting value and the adapter operations applied in order.

Each kind of operation is a small class that checks, at plan time, that it fits the output tensor; its
merge-time form (its tensors loaded, applied to a block of rows) is in `loaded_ops`. Everything here is
plain data of tensor locations and numbers, so planning stays torch-free and the math stays file-free.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from adapter_merge.worker.engine.errors import InputError, UnsupportedOptionError
from adapter_merge.worker.engine.tensor_info import DTYPE_SIZES, SafetensorsBytes, TensorInfo

Layout = Literal["rows", "columns"]
"""How a low-rank delta lies in the stored weight, viewed as 2D (shape[0], rest):
rows: D = s·B@A with A (r, cols), B (rows, r) — Linear and ConvNd, one output unit per row;
columns: D = s·(B@A)ᵀ with A (r, rows), B (cols, r) — GPT-2 Conv1D and Embedding, one output unit per column."""


@dataclass(frozen=True)
class Operation(ABC):
    adapter: int
    """Index of the adapter it comes from, in the requested order."""

    @abstractmethod
    def check(self, target: str, shape: tuple[int, ...]) -> None:
        """Raise InputError unless this operation fits the output tensor `target` of `shape`."""

    def _error(self, info: TensorInfo, module: str, detail: str, error: type[InputError] = InputError) -> InputError:
        """A shape error about adapter tensor `info`, in the words every shape check uses."""
        return error(f"{info.file}: module {module!r}: {detail}", file=info.file, tensor=info.name,
                     input=self.adapter)


@dataclass(frozen=True)
class LoraOp(Operation):
    """A LoRA delta: the weight gains s·B@A (rows layout) or its transpose (columns layout)."""

    module: str
    layout: Layout
    lora_a: TensorInfo
    lora_b: TensorInfo
    scale: float

    def check(self, target: str, shape: tuple[int, ...]) -> None:
        if len(shape) < 2:
            raise self._error(self.lora_a, self.module,
                              f"base tensor {target!r} has shape {list(shape)}; LoRA needs a matrix")
        rows, cols = shape[0], math.prod(shape[1:])
        a, b = self.lora_a.shape, self.lora_b.shape
        r = a[0]
        if len(shape) > 2:  # ConvNd: A is a conv with the base's kernel, B a 1x1 conv
            if a[1:] != shape[1:]:
                raise self._error(self.lora_a, self.module, f"tensor {self.lora_a.name!r} has shape {list(a)} but "
                                  f"the base conv {target!r} has {list(shape)} (groups>1 is not supported)",
                                  UnsupportedOptionError)
            if len(b) != len(shape) or any(d != 1 for d in b[2:]):
                raise self._error(self.lora_b, self.module,
                                  f"tensor {self.lora_b.name!r} has shape {list(b)}, expected a 1x1 conv")
            a, b = (r, cols), (b[0], b[1])
        expected_a, expected_b = ((r, cols), (rows, r)) if self.layout == "rows" else ((r, rows), (cols, r))
        for info, got, expected in ((self.lora_a, a, expected_a), (self.lora_b, b, expected_b)):
            if tuple(got) != expected:
                raise self._error(info, self.module, f"tensor {info.name!r} has shape {list(info.shape)}, "
                                  f"expected {list(expected)} for base tensor {target!r} {list(shape)}")


@dataclass(frozen=True)
class DoraOp(LoraOp):
    """A DoRA update: W' = (m/‖W₀ + D‖)·(W + D), the norm taken per output unit (row or column)."""

    magnitude: TensorInfo

    def check(self, target: str, shape: tuple[int, ...]) -> None:
        super().check(target, shape)
        units = shape[0] if self.layout == "rows" else math.prod(shape[1:])
        if self.magnitude.numel != units:
            raise self._error(self.magnitude, self.module, f"tensor {self.magnitude.name!r} has "
                              f"{self.magnitude.numel} values, expected {units} for base tensor {target!r}")


@dataclass(frozen=True)
class BiasOp(Operation):
    """`lora_bias`: the bias gains s·lora_B.bias."""

    lora_bias: TensorInfo
    scale: float

    def check(self, target: str, shape: tuple[int, ...]) -> None:
        if self.lora_bias.shape != shape:
            raise self._error(self.lora_bias, target, f"tensor {self.lora_bias.name!r} has shape "
                              f"{list(self.lora_bias.shape)}, the base bias {target!r} has {list(shape)}")


@dataclass(frozen=True)
class TokenRowsOp(Operation):
    """Trainable tokens: whole embedding rows replaced by stored values."""

    rows: TensorInfo
    indices: tuple[int, ...]
    config: Path
    """The adapter_config.json that lists the indices."""

    def check(self, target: str, shape: tuple[int, ...]) -> None:
        rows = self.rows.shape
        if len(shape) != 2 or len(rows) != 2 or rows != (len(self.indices), shape[1]):
            raise self._error(self.rows, target, f"tensor {self.rows.name!r} has shape {list(rows)}, expected "
                              f"[{len(self.indices)}, {shape[1] if len(shape) == 2 else '?'}] for {target!r}")
        if not all(0 <= index < shape[0] for index in self.indices):
            raise InputError(f"{self.config}: trainable_token_indices has an index outside 0..{shape[0] - 1}",
                             file=self.config, tensor=target, option="trainable_token_indices", input=self.adapter)


@dataclass(frozen=True)
class TensorContent:
    """What one output tensor is made of: its starting value and the operations applied to it in order."""

    name: str
    source: TensorInfo
    """The base tensor, or the adapter tensor that replaces it (modules_to_save, saved base_layer)."""
    ops: tuple[Operation, ...] = ()
    replaced: bool = False
    """The starting value comes from an adapter (or, for an untied head, from the shared embedding)."""

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def changed(self) -> bool:
        return bool(self.ops) or self.replaced


@dataclass(frozen=True, kw_only=True)
class OutputTensor(TensorContent):
    """One tensor of the output as the plan fixes it: its content, and how and where it is stored."""

    dtype: str
    shard: str
    """The output file it is written to."""

    @property
    def nbytes(self) -> int:
        return self.source.numel * DTYPE_SIZES[self.dtype]

    @property
    def verbatim_bytes(self) -> SafetensorsBytes | None:
        """Where to copy the tensor from byte for byte: nothing to compute, same dtype, and a safetensors
        source; None when it has to be computed."""
        location = self.source.location
        if self.ops or self.dtype != self.source.dtype or not isinstance(location, SafetensorsBytes):
            return None
        return location
