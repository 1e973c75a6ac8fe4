"""Small helpers for the servers tests run on 127.0.0.1: a free port, and waiting for a condition."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
POLL = 0.05


def free_port() -> int:
    """A port nobody listens on right now (a server started with it may still lose a race: retry then)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(condition: Callable[[], T], timeout: float, what: str | Callable[[], str]) -> T:
    """Poll `condition()` until it returns something truthy and return that; fail after `timeout` seconds,
    saying `what` was awaited (a callable is asked only then, e.g. for the last state seen)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what() if callable(what) else what}")
        time.sleep(POLL)
