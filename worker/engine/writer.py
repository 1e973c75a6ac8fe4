"""Writing the merged model: an output folder that appears atomically, and shards written front to back.

Each shard's header is fixed before its first tensor is computed (the plan knows every name, dtype and
shape), so tensors stream into place in order. Bytes are written and checksummed on a thread of their own,
overlapping the computation of the next tensors; a bounded queue keeps memory to a few chunks.

An OS failure on the output side (full disk, permissions, a failed rename) is a `StorageError`, the
machine's fault; only an output folder that already exists (without overwrite) is the requester's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from adapter_merge.worker.engine.errors import DISK_FULL_ERRNOS, InputError, OutputExistsError, StorageError
from adapter_merge.worker.engine.operations import OutputTensor
from adapter_merge.worker.engine.safetensors_format import build_header
from adapter_merge.worker.engine.tensor_io import write_all

SAFETENSORS_METADATA = {"format": "pt"}
QUEUED_CHUNKS = 4


def storage_error(error: OSError, path: Path) -> StorageError:
    """An output-side OSError as a StorageError with the same message, naming `path` if the OS did not;
    `disk_full` when the disk or the quota was full."""
    if error.filename is None:
        error = OSError(error.errno, error.strerror, str(path))
    storage = StorageError(str(error), file=Path(error.filename), disk_full=error.errno in DISK_FULL_ERRNOS)
    storage.__cause__ = error
    return storage


@contextlib.contextmanager
def storage_errors(path: Path) -> Iterator[None]:
    """Raise OSErrors from writing output (`path`, or a file in it) as StorageError."""
    try:
        yield
    except OSError as error:
        raise storage_error(error, path) from error


class OutputFolder:
    """A temporary sibling of the target, renamed into place only when everything in it is complete."""

    def __init__(self, target: Path, overwrite: bool) -> None:
        self.target = target.absolute()
        if self.target.exists() and not overwrite:
            raise OutputExistsError(f"{target}: output folder already exists (use overwrite to replace it)",
                                    file=self.target, option="out")
        if self.target.exists() and not self.target.is_dir():
            raise InputError(f"{target}: exists and is not a folder", file=self.target, option="out")
        self.path = self.target.parent / f".{self.target.name}.partial-{uuid.uuid4().hex[:12]}"
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir()
        except OSError as error:
            raise StorageError(f"{target}: cannot create the output folder: {error.strerror}", file=self.target,
                               disk_full=error.errno in DISK_FULL_ERRNOS) from error

    def commit(self, durable: bool) -> None:
        """Move the finished folder into place; an overwritten folder is swapped out first, then deleted.

        `durable` flushes every file and sub-folder (the shard writer flushes its own shards again, cheaply),
        the folder, and after the rename its parent, so a power loss cannot leave a complete-looking folder with
        empty files.
        """
        if durable:
            with storage_errors(self.path):
                entries = sorted(self.path.rglob("*"), reverse=True)  # a folder's entries before the folder
            for path in entries:
                _fsync_path(path)
            _fsync_path(self.path)
        previous = None
        with storage_errors(self.target):
            if self.target.exists():
                previous = self.target.parent / f".{self.target.name}.replaced-{uuid.uuid4().hex[:12]}"
                self.target.rename(previous)
            self.path.rename(self.target)
        if durable:
            _fsync_path(self.target.parent)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _fsync_path(path: Path) -> None:
    with storage_errors(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class WrittenFile:
    path: Path
    size: int
    sha256: str


class _Shard:
    def __init__(self, path: Path, tensors: list[OutputTensor]) -> None:
        header, data_bytes = build_header([(t.name, t.dtype, t.shape) for t in tensors], SAFETENSORS_METADATA)
        self.path = path
        self.header = header
        self.expected_size = len(header) + data_bytes


class ShardSink:
    """Receives the bytes of consecutive shards, in order, and writes + hashes them on a background thread.

    `data` may be any buffer; `on_written` runs once its bytes are written (it returns a pooled buffer).
    With `fsync`, each shard is flushed to disk before it counts as written. Errors on the thread are
    raised in the caller at the next call (OS errors as StorageError naming the shard).
    """

    def __init__(self, fsync: bool) -> None:
        self._fsync = fsync
        self._queue: queue.Queue[tuple[str, object, object]] = queue.Queue(maxsize=QUEUED_CHUNKS)
        self._error: BaseException | None = None
        self._written: list[WrittenFile] = []
        self._thread = threading.Thread(target=self._run, name="merge-writer", daemon=True)
        self._thread.start()

    def open_shard(self, path: Path, tensors: list[OutputTensor]) -> None:
        self._put("open", _Shard(path, tensors), None)

    def write(self, data: memoryview | bytes, on_written: Callable[[], None] | None = None) -> None:
        self._put("data", data, on_written)

    def close_shard(self) -> None:
        self._put("close", None, None)

    def finish(self) -> list[WrittenFile]:
        """Wait until everything is on disk; returns each shard's size and sha256."""
        self._put("stop", None, None)
        self._thread.join()
        self._raise_pending()
        return self._written

    def abandon(self) -> None:
        """Stop the thread without finishing (after a failure); the caller removes the files."""
        if self._thread.is_alive():
            self._queue.put(("stop", None, None))
            self._thread.join()

    def _put(self, kind: str, item: object, keepalive: object) -> None:
        self._raise_pending()
        while True:
            try:
                self._queue.put((kind, item, keepalive), timeout=0.5)
                return
            except queue.Full:
                self._raise_pending()

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        """Write items until "stop". After an error, keep taking items (returning their buffers) until
        "stop", so a producer waiting for a pooled buffer always gets one and then sees the error."""
        fd, shard, digest, size = -1, None, hashlib.sha256(), 0
        while True:
            kind, item, on_written = self._queue.get()
            if kind == "stop":
                break
            try:
                if self._error is not None:
                    continue
                if kind == "open":
                    assert isinstance(item, _Shard)
                    shard, digest, size = item, hashlib.sha256(), 0
                    fd = os.open(shard.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    item = shard.header
                if kind in ("open", "data"):
                    view = memoryview(item).cast("B")  # type: ignore[arg-type]
                    digest.update(view)
                    write_all(fd, view)
                    size += len(view)
                elif kind == "close":
                    assert shard is not None
                    if size != shard.expected_size:
                        raise RuntimeError(f"{shard.path}: wrote {size} bytes, planned {shard.expected_size}")
                    if self._fsync:
                        os.fsync(fd)
                    os.close(fd)
                    fd = -1
                    self._written.append(WrittenFile(shard.path, size, digest.hexdigest()))
            except BaseException as error:  # handed to the producer thread, which owns error handling
                if isinstance(error, OSError) and shard is not None:
                    error = storage_error(error, shard.path)
                self._error = error
            finally:
                if callable(on_written):
                    on_written()
        if fd >= 0:
            os.close(fd)
