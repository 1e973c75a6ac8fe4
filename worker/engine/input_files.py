"""Opening the merge's input files: only regular files and, with allowed roots, only files inside them.

Every input file the engine reads (configs, the shard index, shards, adapter weights, the side files it copies
and the files it hashes) is opened here. Without roots a path is opened as given, as the command line always
did. With roots (`MergeOptions.allowed_roots`, the service's model folders), a path is first resolved to its
real path, which must lie inside a root; that real path is opened with O_NOFOLLOW (a link swapped in since
is refused), and on Linux the opened descriptor's own path is checked again, so a folder swapped for a link
meanwhile cannot lead outside either. Links within the roots (the Hugging Face cache: snapshot files that
link to `../../blobs/<sha>`) are followed. Whatever the roots, the opened file must be a regular file: a FIFO
or a device would block or never end, and it is opened non-blocking so that even checking cannot hang.

Callers read from the returned open file (never again by path), so what was checked is what is read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping
from io import BufferedReader
from pathlib import Path
from typing import Any

from adapter_merge.worker.engine.errors import InputError, InputRef
from adapter_merge.worker.engine.safe_json import JsonError, parse_json

MAX_CONFIG_BYTES = 16 * 2**20
"""config.json and adapter_config.json: real ones are a few KB; 16 MiB leaves room for big label maps."""
_PROC_FD = Path("/proc/self/fd")


def unreadable(path: Path, input: InputRef, error: OSError) -> InputError:
    """A read of an input that failed (an I/O error, a file truncated meanwhile) as the input's error."""
    return InputError(f"{path}: cannot read: {error.strerror}", file=path, input=input)


class InputFiles:
    """Opens input files for one merge; `roots` None means no restriction (the command line)."""

    def __init__(self, roots: tuple[Path, ...] | None, await_file: Callable[[Path], None] | None = None,
                 names: Mapping[Path, str] | None = None) -> None:
        self.roots = None if roots is None else tuple(Path(os.path.realpath(root)) for root in roots)
        self.await_file = await_file
        """`MergeOptions.await_file`."""
        self.names = names or {}
        """`MergeOptions.input_names`."""

    def _inside(self, real: Path) -> bool:
        return self.roots is None or any(real == root or real.is_relative_to(root) for root in self.roots)

    def open(self, path: Path, input: InputRef, *, contents: bool = True) -> BufferedReader:
        """`path` open for reading; an InputError naming it and `input` if it is not a regular file inside the
        roots or cannot be opened. Opened for its contents, it is complete first (`await_file`); `contents`
        False is for a header or a check, which a file still downloading already answers."""
        if contents and self.await_file is not None:
            self.await_file(path)

        def refuse(detail: str) -> InputError:
            return InputError(f"{path}: {detail}", file=path, input=input)

        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
        target = path
        if self.roots is not None:
            target = self.check_inside(path, input)
            flags |= os.O_NOFOLLOW
        try:
            fd = os.open(target, flags)
        except OSError as error:
            raise refuse(f"cannot open: {error.strerror}") from error
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise refuse("not a regular file")
            if self.roots is not None and _PROC_FD.is_dir() and not self._inside(Path(os.readlink(_PROC_FD / str(fd)))):
                raise refuse("leads outside the allowed folders")
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def check_inside(self, path: Path, input: InputRef) -> Path:
        """`path`'s real path; with roots, an InputError naming `path` and `input` if it lies outside them
        (for entries that are never opened, such as links to folders, as much as for files)."""
        real = Path(os.path.realpath(path))
        if not self._inside(real):
            raise InputError(f"{path}: leads outside the allowed folders", file=path, input=input)
        return real

    def check(self, path: Path, input: InputRef) -> None:
        """Refuse now, at planning, a file that will be opened later (copied or hashed while merging)."""
        self.open(path, input, contents=False).close()

    def read(self, path: Path, input: InputRef, what: str, limit: int) -> bytes:
        """The whole file, refused without reading it when it is larger than `limit` bytes."""
        with self.open(path, input) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > limit:
                raise InputError(f"{path}: {what} is {size} bytes, more than the {limit} bytes this engine reads",
                                 file=path, input=input)
            try:
                data = handle.read(limit + 1)
            except OSError as error:
                raise unreadable(path, input, error) from error
        if len(data) > limit:  # it grew meanwhile
            raise InputError(f"{path}: {what} is more than the {limit} bytes this engine reads", file=path,
                             input=input)
        return data

    def read_json(self, path: Path, what: str, input: InputRef, limit: int = MAX_CONFIG_BYTES) -> dict[str, Any]:
        """A JSON object from merge input `input`, parsed within the limits of `safe_json`; errors name the
        file."""
        if not path.is_file():
            raise InputError(f"{path}: {what} not found", file=path, input=input)
        try:
            value = parse_json(self.read(path, input, what, limit))
        except JsonError as error:
            raise InputError(f"{path}: {what} {error}", file=path, input=input) from error
        if not isinstance(value, dict):
            raise InputError(f"{path}: {what} is not a JSON object", file=path, input=input)
        return value

    def shown(self, folder: Path) -> str:
        """How the manifest names an input folder: relative to the root it lies in when there are roots (the
        server's own paths are none of the reader's business), as given otherwise; by its name if it has one."""
        if folder in self.names:
            return self.names[folder]
        if self.roots is None:
            return str(folder)
        real = Path(os.path.realpath(folder))
        for root in self.roots:
            if real.is_relative_to(root):
                return str(real.relative_to(root))
        return folder.name
