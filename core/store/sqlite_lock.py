"""Waiting for SQLite's locks in short, even steps instead of SQLite's own busy timeout.

SQLite's busy timeout sleeps longer after every refused try (1, 2, 5, 10 ... then 100 ms at a time), so a
lock held for a moment can cost a waiter a tenth of a second. In the embedded store writers queue for the
write lock (the API submitting and cancelling, workers claiming, every running job's heartbeat twice a second)
and a fresh connection to a WAL database may briefly wait for the WAL index; retrying every half millisecond
keeps each wait as long as the lock is really held.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")
LOCK_WAIT_SECONDS = 30.0
"""How long a statement waits for a lock before it fails ("database is locked")."""
RETRY_SECONDS = 0.0005
"""Pause between two tries for a lock."""


class PatientConnection(sqlite3.Connection):
    """A connection (`sqlite3.connect(..., timeout=0, factory=PatientConnection)`) whose statements wait for
    a lock by retrying. A statement is retried only where SQLite allows it after SQLITE_BUSY: outside an
    explicit transaction (BEGIN, a read, a pragma) or as the COMMIT that ends one."""

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:  # type: ignore[override]
        retry = not self.in_transaction or sql.strip().upper() == "COMMIT"
        return _patiently(lambda: super(PatientConnection, self).execute(sql, parameters), retry)

    def executescript(self, script: str, /) -> sqlite3.Cursor:  # type: ignore[override]
        return _patiently(lambda: super(PatientConnection, self).executescript(script), not self.in_transaction)


def _patiently(step: Callable[[], _T], retry: bool) -> _T:
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            return step()
        except sqlite3.OperationalError as error:
            if not retry or error.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
        time.sleep(RETRY_SECONDS)
