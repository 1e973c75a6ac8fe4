"""Local references, safely: a path inside one of the configured model roots, judged after `..` and symlinks are
resolved (so neither can lead outside the roots), and every file in the folder it names as well. Registry
references are `core.sources`' business; the local source stands on this.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from adapter_merge.core.problems import Problem, Problems, ProblemType
from adapter_merge.worker.engine.folder_kind import ADAPTER_MARKER, BASE_MARKER, wrong_kind
from adapter_merge.worker.engine.folder_survey import MAX_DEPTH, MAX_ENTRIES, skipped_folder

__all__ = ["ADAPTER_MARKER", "BASE_MARKER", "MAX_DEPTH", "MAX_ENTRIES", "BadReference", "LocalRootsResolver",
           "check_kind"]


class BadReference(Problem):
    """A reference that cannot be used; names the request field that holds it."""

    def __init__(self, field: str, ref: str, kind: ProblemType, reason: str) -> None:
        super().__init__(kind, f"{field}: {ref!r} {reason}", field=field, ref=ref)


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
            if not self.inside(real):
                raise BadReference(field, ref, Problems.REFERENCE_OUTSIDE_ROOTS, "leads outside the model roots")
            if not real.exists():
                raise BadReference(field, ref, Problems.REFERENCE_NOT_FOUND, "does not exist")
            if not real.is_dir():
                raise BadReference(field, ref, Problems.REFERENCE_NOT_A_FOLDER, "is not a folder")
            self._check_contents(real, ref, field)
        except OSError as error:  # a name too long for the filesystem, a loop of links, ...
            raise BadReference(field, ref, Problems.REFERENCE_INVALID,
                               f"cannot be resolved: {error.strerror or error}") from None
        return real

    def inside(self, path: Path) -> bool:
        return any(path == root or path.is_relative_to(root) for root in self.roots)

    def _check_contents(self, folder: Path, ref: str, field: str) -> None:
        """Every file the merge may read or copy must be a regular file inside the roots: a link from a model
        folder to /etc/passwd or another model must not be merged or served back."""
        for count, entry in enumerate(_walk(folder), start=1):
            name = str(entry.relative_to(folder))
            if count > MAX_ENTRIES or len(entry.relative_to(folder).parts) > MAX_DEPTH:
                raise BadReference(field, ref, Problems.REFERENCE_INVALID,
                                   f"holds more than {MAX_ENTRIES} files or folders nested deeper than {MAX_DEPTH}")
            real = Path(os.path.realpath(entry))
            if not self.inside(real):
                raise BadReference(field, ref, Problems.REFERENCE_OUTSIDE_ROOTS,
                                   f"holds {name!r}, a link that leads outside the model roots")
            if not (real.is_file() or real.is_dir()):
                raise BadReference(field, ref, Problems.REFERENCE_INVALID,
                                   f"holds {name!r}, which is neither a file nor a folder")


def _walk(folder: Path, top: bool = True) -> Iterator[Path]:
    """Entries of a model folder and of the sub-folders the merge reads (tokenizer and pooling folders, not
    `.git` or exports: `folder_survey.skipped_folder`), links not followed."""
    for entry in sorted(folder.iterdir()):
        yield entry
        if entry.is_dir() and not entry.is_symlink() and skipped_folder(entry.name, top) is None:
            yield from _walk(entry, top=False)


def check_kind(path: Path, ref: str, field: str, adapter: bool) -> None:
    """A quick look before planning, so 'wrong kind of folder' reads as such rather than as a parse error, in
    the engine's words (the command line says the same)."""
    if problem := wrong_kind(path, adapter):
        raise BadReference(field, ref, Problems.REFERENCE_WRONG_KIND, problem)
