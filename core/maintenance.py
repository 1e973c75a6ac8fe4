"""Background upkeep: re-queue jobs whose worker died (lease expired), publish again the messages of queued
jobs that may have been lost, delete results past retention, and deliver job callbacks (`core.notify`, in a
thread of its own, so a slow receiver never delays a recovery).

Safe to run in every API process and every worker at once: each change is a compare-and-set in the store,
so exactly one reaper wins each recovery, and deletions are idempotent.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from adapter_merge.core.context import JobContext
from adapter_merge.core.dispatch import Dispatcher
from adapter_merge.core.jobs import FINISHED_STATUSES, JobStatus, utcnow
from adapter_merge.core.notify import Notifier
from adapter_merge.core.store import STORE_UNAVAILABLE

log = logging.getLogger(__name__)


def leases_lost_counter(registry: CollectorRegistry) -> Counter:
    """The metric that counts `on_lease_lost`, under one name and help text in the API and in the workers."""
    return Counter("adapter_merge_leases_lost", "Running jobs this process's reaper found with an expired lease "
                   "(their worker died) and recovered.", registry=registry)


class Maintenance:
    def __init__(self, context: JobContext, dispatcher: Dispatcher,
                 on_lease_lost: Callable[[], object] = lambda: None) -> None:
        self.store, self.layout, self.settings = context.store, context.layout, context.settings
        self.dispatcher = dispatcher
        self.on_lease_lost = on_lease_lost
        """Told of every job this reaper recovered (the API and workers count them as a metric)."""
        self._answered: float | None = None
        """When (monotonic) the store last answered this reaper; None before the first answer and after a
        call that failed."""
        self._steady_since: float | None = None
        """Since when the store has answered this reaper without a silence long enough to cost a live worker
        its lease."""

    @property
    def max_silence(self) -> float:
        """The longest the store may go without answering this reaper and still have been reachable for
        every live worker to renew: a worker renews at most a heartbeat (plus a poll interval to notice, plus
        one to retry) before its lease would run out."""
        settings = self.settings
        return max(settings.lease_seconds - settings.heartbeat_seconds - 2 * settings.poll_seconds,
                   settings.poll_seconds)

    @property
    def pass_interval(self) -> float:
        """Seconds between passes: the reap interval, but often enough that a steady store is seen as steady."""
        return min(self.settings.reap_interval_seconds, self.max_silence / 2)

    def lost_store(self) -> None:
        """A store call failed: the store may be down for the workers too, so leases are not judged until it
        has answered steadily for a lease again."""
        self._answered = None

    def _store_now(self) -> float:
        """The store's clock, noting whether the store has answered steadily (see `judging_leases`)."""
        now = self.store.now()
        answered = time.monotonic()
        if self._answered is None or answered - self._answered > self.max_silence:
            if self._steady_since is not None:
                silence = "did not answer" if self._answered is None else \
                    f"was silent for {answered - self._answered:.1f} s"
                log.warning("maintenance: the job store %s; judging no lease for %.1f s, so that every live "
                            "worker can renew first", silence, self.settings.lease_seconds)
            self._steady_since = answered
        self._answered = answered
        return now

    def judging_leases(self) -> bool:
        """Only once the store has answered steadily for a whole lease (after this reaper starts, and again
        after an outage or a silence of more than `max_silence`): the workers' heartbeats could not land
        meanwhile either, and each live worker renews within a lease of the store's return. So an outage of
        the store does not cost a running job its worker, however long it lasts (README: recovery)."""
        return (self._answered is not None and self._steady_since is not None
                and self._answered - self._steady_since >= self.settings.lease_seconds)

    def reap(self) -> list[str]:
        """Recover every running job whose lease has expired and publish again the messages of jobs queued
        for too long; returns the ids that were queued again.

        The expired jobs are listed first and recovered afterwards, against the clock read before the listing:
        a lease the listing shows expired had run out while the store was answering."""
        now = self._store_now()
        requeued = self._recover(now) if self.judging_leases() else []
        self._republish(now)
        return requeued

    def _recover(self, now: float) -> list[str]:
        expired = [job for job in self.store.all_jobs([JobStatus.running]) if (job.lease_expires_at or 0) <= now]
        requeued = []
        for job in expired:
            recovered = self.store.recover(job.id, self.settings.max_recoveries)
            if recovered is None:
                continue
            self.on_lease_lost()
            if recovered.status is not JobStatus.queued:  # a queued job's scratch is its next run's to clear
                self.layout.clean_work(job.id)
            log.warning("job %s lost worker %s; now %s", job.id, job.worker, recovered.status.value)
            if recovered.status is JobStatus.queued:
                self.dispatcher.submit(job.id)
                requeued.append(job.id)
        return requeued

    def _republish(self, now: float) -> list[str]:
        """Distributed mode: a job still queued a grace period after its message was published may have lost
        it (the API died between storing and publishing, the queue was deleted): publish it again, at most once
        per grace period among all reapers (`JobStore.republish`). Embedded mode has no messages to lose."""
        if not self.settings.distributed:
            return []
        grace = self.settings.requeue_grace_seconds
        due = []
        for job in self.store.all_jobs([JobStatus.queued], oldest_first=True):
            if job.created_at.timestamp() > now - grace:
                break  # created within the grace period, as is every job after it
            if job.queued_at.timestamp() <= now - grace:
                due.append(job.id)
        republished = []
        for job_id in due:
            if self.store.republish(job_id, grace) is not None:
                log.warning("job %s: still queued %.0f s after its message was published; published again",
                            job_id, grace)
                self.dispatcher.submit(job_id)
                republished.append(job_id)
        return republished

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
    """Runs `reap` every reap interval and (optionally) `clean` every cleanup interval, until stopped; and
    beside it the callback deliveries, where a signing secret is configured."""

    def __init__(self, context: JobContext, dispatcher: Dispatcher, retention: bool,
                 on_lease_lost: Callable[[], object] = lambda: None) -> None:
        self.work = Maintenance(context, dispatcher, on_lease_lost)
        self.settings = context.settings
        self.retention = retention
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="merge-maintenance", daemon=True)
        self.notifier = Notifier.of(context)

    def start(self) -> None:
        self._thread.start()
        if self.notifier is not None:
            self.notifier.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self.notifier is not None:
            self.notifier.stop(timeout)
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
                self.work.lost_store()
                log.warning("maintenance: job store unavailable (%s); retrying", error)
            except Exception:  # a disk hiccup or a bug must not end upkeep for good
                log.exception("maintenance pass failed; retrying in %.0f s", self.work.pass_interval)
            self._stop.wait(self.work.pass_interval)
