"""A worker process tells the job store it is alive, so `/readyz` can say when no worker is there to run jobs.

Every `MERGE_HEARTBEAT_SECONDS` the worker records itself as alive for `MERGE_LEASE_SECONDS` of the store's
clock: a worker unseen for a lease is as dead as its jobs' leases say. A worker that stops cleanly withdraws
at once. A store that does not answer is retried at the next beat; readiness reports the store itself.

The Celery main process beats from a thread (`start`/`stop`); the embedded worker, which forks its merge
processes, calls `beat` from its own loop instead: a fork while a thread holds SQLite's mutexes would leave
the child waiting on them forever.
"""

from __future__ import annotations

import logging
import threading
import time

from adapter_merge.core.settings import Settings
from adapter_merge.core.store import STORE_UNAVAILABLE, JobStore

log = logging.getLogger(__name__)


class Presence:
    """The heartbeat of one worker process (the Celery main process, an embedded worker)."""

    def __init__(self, store: JobStore, settings: Settings, identity: str) -> None:
        self.store, self.settings, self.identity = store, settings, identity
        self._due = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-presence", daemon=True)

    def beat(self) -> None:
        """Record the heartbeat if one is due; call at least every MERGE_HEARTBEAT_SECONDS."""
        if time.monotonic() >= self._due:
            self._due = time.monotonic() + self.settings.heartbeat_seconds
            self._announce(self.settings.lease_seconds)

    def withdraw(self) -> None:
        """The worker stops: it no longer counts as alive."""
        self._announce(0.0)

    def start(self) -> None:
        """Beat from a thread of its own until `stop`."""
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.settings.heartbeat_seconds + 5)
        self.withdraw()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(self.settings.heartbeat_seconds)

    def _announce(self, seconds: float) -> None:
        try:
            self.store.worker_seen(self.identity, seconds)
        except STORE_UNAVAILABLE as error:
            log.warning("worker %s: cannot record its heartbeat, the job store is unreachable (%s)",
                        self.identity, error)
