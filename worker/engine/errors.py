"""Errors the engine raises. Every message names the file, tensor or option at fault, and every error carries
those facts as attributes too, so callers map an error to a request field without reading its text.

The split matters to callers: an `InputError` is the requester's fault (a 4xx at the API, found before any
output is written); a `NumericError` is found while merging, in data the requester supplied; a
`StorageError` is the machine's (a full disk); `MergeCancelled` is not an error at all, just a stop that was
asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

Fault = Literal["input", "machine"]
InputRef = Literal["base"] | int
"""Which input an error is about: the base model, or an adapter by its 0-based position in the request."""


class MergeError(Exception):
    """Base of everything the engine raises on purpose."""

    fault: ClassVar[Fault] = "input"

    def __init__(self, message: str, *, file: Path | None = None, tensor: str | None = None,
                 option: str | None = None, input: InputRef | None = None) -> None:
        super().__init__(message)
        self.file = file
        """The file at fault."""
        self.tensor = tensor
        """The tensor at fault, by its name in `file`."""
        self.option = option
        """The merge option or adapter-config option at fault (dtype, max_shard_size, out, r, ...)."""
        self.input = input
        """The input at fault; for an adapter that does not fit the base, the adapter."""


class InputError(MergeError):
    """A base model, adapter or option that cannot be merged as given."""


class UnsupportedOptionError(InputError):
    """An adapter option the engine refuses rather than merge wrongly."""


class NumericError(MergeError):
    """A merged or input tensor that is not finite, or does not fit the output dtype."""


class StorageError(MergeError):
    """The output could not be written (disk full, permissions): the machine's fault, not the request's."""

    fault = "machine"


class MergeCancelled(MergeError):
    """The caller asked the merge to stop; its partial output has been removed."""
