"""Errors the engine raises. Every message names the file, tensor or option at fault, and every error also
carries those facts as attributes, so callers never parse a message to learn what went wrong.

The split matters to callers: `fault` says whose fault it is. An `InputError` is the requester's (a 4xx at
the API, found before any output is written); a `NumericError` is found while merging, in data the
requester supplied; a `StorageError` is the machine's (the output could not be written: a full disk, a
permission). `MergeCancelled` is not a fault at all, just a stop that was asked for.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import ClassVar, Literal

BRIEF_CHARS = 80


def brief(value: object) -> str:
    """`repr(value)`, cut to BRIEF_CHARS: a message quotes what it refuses, not a megabyte of it."""
    text = repr(value)
    return text if len(text) <= BRIEF_CHARS else f"{text[:BRIEF_CHARS]}... ({len(text)} characters)"


InputRef = Literal["base"] | int | None
"""Which input an error is about: "base", an adapter's 0-based index in the requested order, or None."""
Fault = Literal["input", "machine"]


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""OS errors that mean the disk (or the user's quota) is full: a `StorageError` with `disk_full`."""


class MergeError(Exception):
    """Base of everything the engine raises on purpose.

    `str(error)` is the message for people. The attributes are set by the raiser, None when they do not
    apply: `file` the file at fault; `tensor` the tensor's name; `option` the merge option ("dtype",
    "max_shard_size", "out", "weights", "adapters") or adapter-config option ("r", "use_dora", ...) at
    fault; `input` the input it is about (for a mismatch between an adapter and the base: the adapter).
    """

    fault: ClassVar[Fault]
    """Whose fault: "input" (the requester's data or options) or "machine"; subclasses set it."""

    def __init__(
        self,
        message: str,
        *,
        file: Path | None = None,
        tensor: str | None = None,
        option: str | None = None,
        input: InputRef = None,
    ) -> None:
        super().__init__(message)
        self.file = file
        self.tensor = tensor
        self.option = option
        self.input = input


class InputError(MergeError):
    """A base model, adapter or option that cannot be merged as given."""

    fault = "input"


class OutputExistsError(InputError):
    """The output folder exists and overwriting it was not asked for; `file` is the folder. A class of its
    own so that each caller can name its own way to ask (the command line's `--overwrite`)."""


class UnsupportedOptionError(InputError):
    """An adapter option the engine refuses rather than merge wrongly."""


class NumericError(MergeError):
    """A merged or input tensor that is not finite, or does not fit the output dtype."""

    fault = "input"


class StorageError(MergeError):
    """The output could not be written (folder, shards, side files, the final rename); `file` says where.

    `disk_full` says whether the disk (or the user's quota) was full (ENOSPC, EDQUOT), as opposed to any other
    failure (permissions, a file size limit, an I/O error): a full disk may pass once space is freed."""

    fault = "machine"

    def __init__(self, message: str, *, file: Path | None = None, disk_full: bool = False) -> None:
        super().__init__(message, file=file)
        self.disk_full = disk_full


class MergeCancelled(MergeError):
    """The caller asked the merge to stop; its partial output has been removed. Not a fault: no `fault`."""
