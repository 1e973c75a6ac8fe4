"""Writing the merged model: an output folder that appears atomically, and shards written front to back.

Each shard's header is fixed before its first tensor is computed (the plan knows every name, dtype and
shape), so tensors stream into place in order and nothing is held back in memory for a final save.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from worker.engine.errors import InputError
from worker.engine.operations import OutputTensor
from worker.engine.safetensors_format import build_header
from worker.engine.tensor_io import TensorReader, write_all

SAFETENSORS_METADATA = {"format": "pt"}


class OutputFolder:
    """A temporary sibling of the target, renamed into place only when everything in it is complete."""

    def __init__(self, target: Path, overwrite: bool) -> None:
        self.target = target.absolute()
        if self.target.exists() and not overwrite:
            raise InputError(f"{target}: output folder already exists (use overwrite to replace it)")
        if self.target.exists() and not self.target.is_dir():
            raise InputError(f"{target}: exists and is not a folder")
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.path = self.target.parent / f".{self.target.name}.partial-{uuid.uuid4().hex[:12]}"
            self.path.mkdir()
        except OSError as error:
            raise InputError(f"{target}: cannot create the output folder: {error.strerror}") from error

    def commit(self) -> None:
        """Move the finished folder into place; an overwritten folder is swapped out first, then deleted."""
        previous = None
        if self.target.exists():
            previous = self.target.parent / f".{self.target.name}.replaced-{uuid.uuid4().hex[:12]}"
            self.target.rename(previous)
        self.path.rename(self.target)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class ShardWriter:
    """Writes one safetensors file whose tensors must arrive in the planned order with the planned sizes."""

    def __init__(self, path: Path, tensors: list[OutputTensor]) -> None:
        header, self._planned = build_header(
            [(tensor.name, tensor.dtype, tensor.shape) for tensor in tensors], SAFETENSORS_METADATA
        )
        self.path = path
        self._next = 0
        self._written_in_tensor = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        write_all(self._fd, header)

    def _expect(self, name: str) -> int:
        planned = self._planned[self._next]
        if planned.name != name:
            raise RuntimeError(f"{self.path}: expected tensor {planned.name!r}, got {name!r}")
        return planned.nbytes

    def write_block(self, name: str, data: memoryview) -> None:
        """Append part of a tensor; the tensor is complete once its planned size has been written."""
        expected = self._expect(name)
        self._written_in_tensor += len(data)
        if self._written_in_tensor > expected:
            raise RuntimeError(f"{self.path}: tensor {name!r} got more than its {expected} bytes")
        write_all(self._fd, data)
        if self._written_in_tensor == expected:
            self._next += 1
            self._written_in_tensor = 0

    def copy_tensor(self, name: str, reader: TensorReader, tensor: OutputTensor) -> None:
        """Append a tensor copied byte for byte from its source file."""
        if self._expect(name) != tensor.source.nbytes or self._written_in_tensor:
            raise RuntimeError(f"{self.path}: tensor {name!r} cannot be copied verbatim here")
        reader.copy_to(tensor.source, self._fd)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._planned):
            os.close(self._fd)
            raise RuntimeError(f"{self.path}: closed after {self._next} of {len(self._planned)} tensors")
        os.fsync(self._fd)
        os.close(self._fd)
