"""Misbehaviour a test can ask of the fake hub, per repo or per file: stall (accept the request and never
answer), trickle (answer, then send the body a few bytes at a time) or corrupt (send the right number of bytes,
one of them wrong). `heal()` ends every fault and wakes every stalled request, which then closes its
connection without an answer."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import Enum


class FaultKind(Enum):
    STALL = "stall"
    TRICKLE = "trickle"
    CORRUPT = "corrupt"


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    bytes_per_second: int = 0
    """For TRICKLE."""


class Faults:
    """Faults by (repo id, path in repo); a path of None means every request about the repo."""

    def __init__(self) -> None:
        self._faults: dict[tuple[str, str | None], Fault] = {}
        self._lock = threading.Lock()
        self._released = threading.Event()

    def set(self, repo_id: str, path: str | None, fault: Fault) -> None:
        with self._lock:
            self._faults[(repo_id, path)] = fault

    def get(self, repo_id: str, path: str | None) -> Fault | None:
        with self._lock:
            return self._faults.get((repo_id, path))

    def release_event(self) -> threading.Event:
        """The event a stalled or trickling request waits on; set by the next `heal()`."""
        with self._lock:
            return self._released

    def heal(self) -> None:
        with self._lock:
            self._faults.clear()
            released, self._released = self._released, threading.Event()
        released.set()
