"""Reading the model's bytes a few chunks ahead of the computation, on a thread of its own.

Copying a chunk out of the page cache is the kernel's work, ~0.3 s per GB here; left on the compute thread
it was a quarter of that thread's time in a LoRA merge of the 1.1B model (perf: 0.66 of 2.7 CPU s), while
the other core, which hashes and writes, had time to spare. The merge knows every read it will make
(`ByteRange`s, in order), so a reader thread makes them first, into pooled buffers, and the compute thread
takes them in the same order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable

import torch

from adapter_merge.worker.engine.tensor_io import BufferPool, ByteRange, TensorReader

WAIT_SECONDS = 0.1
"""How often a waiting reader thread looks whether the merge has stopped."""

Chunk = tuple[torch.Tensor, Callable[[], None]]
"""A buffer holding a range's bytes and the callback that returns it to its pool."""


class ReadAhead:
    """Performs `ranges` in order, at most `depth` ahead of `take`. Errors are raised by `take`, in order."""

    def __init__(self, reader: TensorReader, ranges: Iterable[ByteRange], pool: BufferPool, depth: int) -> None:
        self._reader = reader
        self._pool = pool
        self._done: queue.Queue[tuple[ByteRange, Chunk] | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(ranges),), name="merge-reader", daemon=True)
        self._thread.start()

    def take(self, expected: ByteRange) -> Chunk:
        """The next range's bytes, which must be `expected`: the caller follows the order it planned."""
        item = self._done.get()
        if isinstance(item, BaseException):
            raise item
        done, chunk = item
        if done != expected:
            chunk[1]()
            raise RuntimeError(f"read ahead {done}, but the merge asked for {expected}")
        return chunk

    def close(self) -> None:
        """Stop reading and return every buffer read but not taken (after a failure, or at the end)."""
        self._stop.set()
        while self._thread.is_alive() or not self._done.empty():
            try:
                item = self._done.get(timeout=WAIT_SECONDS)
            except queue.Empty:
                continue
            if not isinstance(item, BaseException):
                item[1][1]()
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, ranges: Iterable[ByteRange]) -> None:
        try:
            for chunk_range in ranges:
                chunk = self._acquire(chunk_range.nbytes)
                if chunk is None:
                    return
                try:
                    self._reader.read_range(chunk_range, chunk[0])
                except BaseException:
                    chunk[1]()
                    raise
                if not self._put((chunk_range, chunk)):
                    chunk[1]()
                    return
        except BaseException as error:  # handed to the compute thread, which owns error handling
            self._put(error)

    def _acquire(self, nbytes: int) -> Chunk | None:
        """A pooled buffer, or None once the merge has stopped."""
        while not self._stop.is_set():
            try:
                return self._pool.acquire(nbytes, timeout=WAIT_SECONDS)
            except queue.Empty:
                continue
        return None

    def _put(self, item: tuple[ByteRange, Chunk] | BaseException) -> bool:
        """Hand `item` over; False if the merge stopped first."""
        while not self._stop.is_set():
            try:
                self._done.put(item, timeout=WAIT_SECONDS)
                return True
            except queue.Full:
                continue
        return False
