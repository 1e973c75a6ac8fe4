"""Store locks that a worker holds for as long as a piece of work takes: a download into the cache (one per entry,
across processes and hosts), a publish (one per target). The store gives a lock for a time, so a holder that dies
loses it; a holder that lives renews it from a thread of its own, however slowly its work goes."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

from adapter_merge.core.settings import Settings
from adapter_merge.core.store import JobStore

log = logging.getLogger(__name__)


class LockKeeper:
    """Renews `lock` every heartbeat interval until `stop`; `lost` once the store gave it to someone else."""

    def __init__(self, store: JobStore, lock: str, owner: str, settings: Settings) -> None:
        self.store, self.lock, self.owner, self.settings = store, lock, owner, settings
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"keep-{lock}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                if not self.store.acquire_lock(self.lock, self.owner, self.settings.lease_seconds):
                    self.lost = True
                    return
            except Exception:  # the store is out of reach: try again next beat, the lock outlasts a few
                log.warning("could not renew lock %s; retrying", self.lock, exc_info=True)


@contextlib.contextmanager
def held(store: JobStore, lock: str, owner: str, settings: Settings,
         give_up: Callable[[], None]) -> Iterator[LockKeeper]:
    """`lock`, taken (waiting while another holder has it), renewed during the block and given up after it.
    While it waits, `give_up()` is called every poll interval and may raise to stop waiting."""
    while not store.acquire_lock(lock, owner, settings.lease_seconds):
        give_up()
        time.sleep(settings.poll_seconds)
    keeper = LockKeeper(store, lock, owner, settings)
    try:
        yield keeper
    finally:
        keeper.stop()
        store.release_lock(lock, owner)
