"""Turning a request's references into folders, safely.

Today a reference is a path inside one of the configured model roots; registry and object-store references
will come later behind the same `Resolver` interface. A path is judged after `..` and symlinks are resolved,
so neither can lead outside the roots.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from adapter_merge.core.problems import Problem, Problems, ProblemType

BASE_MARKER = "config.json"
ADAPTER_MARKER = "adapter_config.json"


class BadReference(Problem):
    """A reference that cannot be used; names the request field that holds it."""

    def __init__(self, field: str, ref: str, kind: ProblemType, reason: str) -> None:
        super().__init__(kind, f"{field}: {ref!r} {reason}", field=field, ref=ref)


class Resolver(Protocol):
    def resolve(self, ref: str, field: str) -> Path:
        """The real folder `ref` names, or raise `BadReference`."""
        ...


class LocalRootsResolver:
    """References are paths inside MERGE_MODEL_ROOTS: absolute, or relative to the first root."""

    def __init__(self, roots: list[Path]) -> None:
        self.roots = [Path(os.path.realpath(root)) for root in roots]

    def resolve(self, ref: str, field: str) -> Path:
        """Messages name the reference as the client wrote it, never the server path it resolves to."""
        if "\x00" in ref:
            raise BadReference(field, ref, Problems.REFERENCE_INVALID, "contains a NUL byte")
        given = Path(ref)  # `~` means nothing on a server: it is a folder name like any other
        candidate = given if given.is_absolute() else self.roots[0] / given
        try:
            real = Path(os.path.realpath(candidate))
            if not any(real == root or real.is_relative_to(root) for root in self.roots):
                raise BadReference(field, ref, Problems.REFERENCE_OUTSIDE_ROOTS, "leads outside the model roots")
            if not real.exists():
                raise BadReference(field, ref, Problems.REFERENCE_NOT_FOUND, "does not exist")
            if not real.is_dir():
                raise BadReference(field, ref, Problems.REFERENCE_NOT_A_FOLDER, "is not a folder")
        except OSError as error:  # a name too long for the filesystem, a loop of links, ...
            raise BadReference(field, ref, Problems.REFERENCE_INVALID,
                               f"cannot be resolved: {error.strerror or error}") from None
        return real


def check_kind(path: Path, ref: str, field: str, adapter: bool) -> None:
    """A quick look before planning, so 'wrong kind of folder' reads as such rather than as a parse error."""
    marker = ADAPTER_MARKER if adapter else BASE_MARKER
    if not (path / marker).is_file():
        kind = "a PEFT adapter" if adapter else "a base model"
        hint = " (it looks like an adapter)" if not adapter and (path / ADAPTER_MARKER).is_file() else ""
        raise BadReference(field, ref, Problems.REFERENCE_WRONG_KIND, f"is not {kind}: it has no {marker}{hint}")
