"""Handing a queued job to whatever runs it. The job record is the source of truth in both modes; a message
is only a wake-up call, so sending one twice is harmless (the second delivery finds the job claimed)."""

from __future__ import annotations

import contextlib
import os
import select
import stat
from pathlib import Path
from typing import Protocol

BELL_NAME = "queue.bell"
"""The embedded workers' wake-up FIFO, in the data dir beside the job store."""


class Dispatcher(Protocol):
    def submit(self, job_id: str) -> None: ...

    def ping(self) -> None:
        """Raise if jobs cannot be handed over now."""
        ...


class StoreQueue:
    """Embedded mode: no broker; the local worker claims queued jobs straight from the store, woken by the bell."""

    def __init__(self, data_dir: Path) -> None:
        self.bell = data_dir / BELL_NAME

    def submit(self, job_id: str) -> None:
        ring(self.bell)

    def ping(self) -> None:
        return None


def ring(bell: Path) -> None:
    """Wake an idle embedded worker at once instead of at its next poll of the store (MERGE_POLL_SECONDS). A
    byte in the FIFO, never blocking nor failing the submission: without a worker listening (ENXIO, ENOENT) it
    finds the job when it starts, a full FIFO means wake-ups are pending already, and any other failure only
    leaves the job to the next poll."""
    try:
        fd = os.open(bell, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.write(fd, b"\0")
    finally:
        os.close(fd)


class BellListener:
    """A worker's end of the bell. Opened read-write, so the FIFO has a reader (the API's ring lands) and
    `wait` never sees an end-of-file, whoever else comes and goes."""

    def __init__(self, bell: Path) -> None:
        if not _is_fifo(bell):
            with contextlib.suppress(FileNotFoundError):
                bell.unlink()  # not ours: a FIFO only ever lives there
            with contextlib.suppress(FileExistsError):  # another worker made it meanwhile
                os.mkfifo(bell, 0o600)
        self.fd = os.open(bell, os.O_RDWR | os.O_NONBLOCK)

    def wait(self, timeout: float) -> bool:
        """Until rung or `timeout` seconds have passed; True if rung. Consumes every pending ring: the caller
        looks at the store afterwards, which answers them all."""
        readable, _, _ = select.select([self.fd], [], [], timeout)
        if not readable:
            return False
        with contextlib.suppress(BlockingIOError):  # another idle worker drained it first
            while os.read(self.fd, 4096):
                pass
        return True

    def interrupt(self) -> None:
        """End a `wait` from within this process (a signal handler: the worker is stopping)."""
        with contextlib.suppress(BlockingIOError):
            os.write(self.fd, b"\0")

    def close(self) -> None:
        os.close(self.fd)


def _is_fifo(path: Path) -> bool:
    try:
        return stat.S_ISFIFO(path.lstat().st_mode)
    except FileNotFoundError:
        return False
