"""What the engine knows of a stored tensor before reading it: name, dtype, shape, which input it belongs to,
and where its bytes lie. Dtypes are safetensors' codes ("BF16", "F32", ...) throughout the engine."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from adapter_merge.worker.engine.errors import InputRef

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
FP8_DTYPES = frozenset({"F8_E5M2", "F8_E4M3"})


@dataclass(frozen=True)
class SafetensorsBytes:
    """A tensor's bytes as one range of a safetensors file: readable by rows and copyable verbatim."""

    file: Path
    offset: int
    """Absolute, within `file`."""


@dataclass(frozen=True)
class PickledTensor:
    """A tensor inside a legacy `torch.save` archive (adapter_model.bin): only `torch.load` can read it."""

    file: Path


Location = SafetensorsBytes | PickledTensor


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    location: Location
    input: InputRef
    """The merge input whose file holds the tensor, so that any error about it can say so."""

    @property
    def file(self) -> Path:
        return self.location.file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]
