"""Background upkeep: re-queue jobs whose worker died (lease expired) and delete results past retention.

Safe to run in every API process and every worker at once: each change is a compare-and-set in the store,
so exactly one reaper wins each recovery, and deletions are idempotent.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from datetime import timedelta
from pathlib import Path

from adapter_merge.core.context import JobContext
from adapter_merge.core.dispatch import Dispatcher
from adapter_merge.core.jobs import FINISHED_STATUSES, JobStatus, utcnow
from adapter_merge.core.store import STORE_UNAVAILABLE

log = logging.getLogger(__name__)


class Maintenance:
    def __init__(self, context: JobContext, dispatcher: Dispatcher) -> None:
        self.store, self.layout, self.settings = context.store, context.layout, context.settings
        self.dispatcher = dispatcher

    def reap(self) -> list[str]:
        """Recover every running job whose lease has expired; returns the ids that were queued again.

        The expired jobs are listed first and recovered afterwards: recovering moves a job out of the running
        set, which would shift the pages of a listing still in progress and skip jobs."""
        now = self.store.now()
        expired = [job for job in self.store.all_jobs([JobStatus.running]) if (job.lease_expires_at or 0) <= now]
        requeued = []
        for job in expired:
            recovered = self.store.recover(job.id, self.settings.max_recoveries)
            if recovered is None:
                continue
            if recovered.status is not JobStatus.queued:  # a queued job's scratch is its next run's to clear
                self.layout.clean_work(job.id)
            log.warning("job %s lost worker %s; now %s", job.id, job.worker, recovered.status.value)
            if recovered.status is JobStatus.queued:
                self.dispatcher.submit(job.id)
                requeued.append(job.id)
        return requeued

    def clean(self) -> list[str]:
        """Delete finished jobs (and their files) older than the retention; returns their ids."""
        if self.settings.retention_seconds <= 0:
            return []
        cutoff = utcnow() - timedelta(seconds=self.settings.retention_seconds)
        expired = [job.id for job in self.store.all_jobs(FINISHED_STATUSES, oldest_first=True)
                   if job.finished_at is not None and job.finished_at < cutoff]
        for job_id in expired:
            if self.store.delete(job_id):
                self.layout.remove_job(job_id)
        self._sweep_orphans(cutoff.timestamp())
        return expired

    def _sweep_orphans(self, cutoff: float) -> None:
        """Folders no run owns any more (all older than `cutoff`): crashed deletions, results of jobs deleted
        mid-publish, results of runs that lost their lease, scratch of runs that died."""
        for root in (self.layout.artifacts_root, self.layout.work_root):
            for folder in _older_than(root, cutoff):
                job = None if folder.name.startswith(".") else self.store.get(folder.name)
                if job is None:
                    shutil.rmtree(folder, ignore_errors=True)
                    continue
                for run in _older_than(folder, cutoff):
                    if run.name != f"attempt-{job.attempt}" or (root == self.layout.work_root
                                                                 and job.status is not JobStatus.running):
                        shutil.rmtree(run, ignore_errors=True)


def _older_than(folder: Path, cutoff: float) -> list[Path]:
    """Sub-folders last changed before `cutoff` (epoch seconds); tolerant of concurrent removal."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in folder.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if entry.is_dir() and entry.stat().st_mtime < cutoff:
                    found.append(entry)
    return found


class MaintenanceThread:
    """Runs `reap` every reap interval and (optionally) `clean` every cleanup interval, until stopped."""

    def __init__(self, context: JobContext, dispatcher: Dispatcher, retention: bool) -> None:
        self.work = Maintenance(context, dispatcher)
        self.settings = context.settings
        self.retention = retention
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="merge-maintenance", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        next_clean = time.monotonic()
        while not self._stop.is_set():
            try:
                self.work.reap()
                if self.retention and time.monotonic() >= next_clean:
                    next_clean = time.monotonic() + self.settings.cleanup_interval_seconds
                    self.work.clean()
            except STORE_UNAVAILABLE as error:
                log.warning("maintenance: job store unavailable (%s); retrying", error)
            except Exception:  # a disk hiccup or a bug must not end upkeep for good
                log.exception("maintenance pass failed; retrying in %.0f s", self.settings.reap_interval_seconds)
            self._stop.wait(self.settings.reap_interval_seconds)
