"""Misbehaviour a test can ask of the fake hub, per repo or per file: stall (accept the request and never
answer), trickle (answer, then send the body a few bytes at a time) or corrupt (send the right number of bytes,
one of them wrong); per repo, a commit whose answer is lost (made, then the connection closes unanswered); and
actions run before requests of a kind (another writer getting in between). `heal()` ends every fault and wakes
every stalled request, which then closes its connection without an answer."""

from __future__ import annotations

import threading
from collections.abc import Callable
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
        self._lost_answers: set[str] = set()
        self._actions: dict[str, list[Callable[[], object]]] = {}
        self._lock = threading.Lock()
        self._released = threading.Event()

    def set(self, repo_id: str, path: str | None, fault: Fault) -> None:
        with self._lock:
            self._faults[(repo_id, path)] = fault

    def get(self, repo_id: str, path: str | None) -> Fault | None:
        with self._lock:
            return self._faults.get((repo_id, path))

    def lose_commit_answer(self, repo_id: str) -> None:
        with self._lock:
            self._lost_answers.add(repo_id)

    def commit_answer_lost(self, repo_id: str) -> bool:
        """Whether this commit's answer is to be lost (once)."""
        with self._lock:
            if repo_id not in self._lost_answers:
                return False
            self._lost_answers.discard(repo_id)
            return True

    def before(self, kind: str, action: Callable[[], object], times: int) -> None:
        with self._lock:
            self._actions.setdefault(kind, []).extend([action] * times)

    def run_before(self, kind: str) -> None:
        """The next action set for requests of `kind`, if any, run now (in the server's thread)."""
        with self._lock:
            actions = self._actions.get(kind)
            action = actions.pop(0) if actions else None
        if action is not None:
            action()

    def release_event(self) -> threading.Event:
        """The event a stalled or trickling request waits on; set by the next `heal()`."""
        with self._lock:
            return self._released

    def heal(self) -> None:
        with self._lock:
            self._faults.clear()
            self._lost_answers.clear()
            self._actions.clear()
            released, self._released = self._released, threading.Event()
        released.set()
