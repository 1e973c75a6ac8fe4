"""The job store interface. Backends only provide storage and one atomic read-modify-write; every state
rule (claiming, leases, cancelling) is written once, here, as functions of a record.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from adapter_merge.core.jobs import FINISHED_STATUSES, JobRecord, JobStatus, Progress, utcnow
from adapter_merge.core.problems import Problem, Problems
from adapter_merge.core.webhooks import pending_delivery

PAGE = 200
Change = Callable[[JobRecord, float], JobRecord | None]
"""Given the current record and the store clock, return the new record, or None to leave it unchanged."""
Cursor = tuple[float, str]
"""A place in creation order: the creation time (epoch seconds, as stored) and id of the last job seen."""


class QuotaExceeded(Exception):
    """A tenant already has as many active (queued or running) jobs as it may."""

    def __init__(self, tenant: str, active: int, limit: int) -> None:
        super().__init__(f"tenant {tenant!r} has {active} queued or running jobs, the limit is {limit}")
        self.tenant, self.active, self.limit = tenant, active, limit


class LockBusy(Exception):
    """A lock stayed held by someone else for as long as the caller could wait."""


@dataclass(frozen=True)
class IdempotencyRecord:
    """What the store keeps of one tenant's Idempotency-Key: the request it was first sent with (`fingerprint`)
    and, once that request was answered, the answer; until then `owner` is the request still processing it."""

    fingerprint: str
    owner: str
    job_id: str | None = None
    status_code: int | None = None


class JobStore(ABC):
    """Where jobs live. All methods are safe to call from several processes and hosts at once."""

    @abstractmethod
    def create(self, job: JobRecord, max_active: int | None = None) -> None:
        """Store a new job; with `max_active`, atomically refuse it (`QuotaExceeded`) when its tenant already
        has that many queued or running jobs."""

    @abstractmethod
    def get(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    def list(
        self, statuses: Collection[JobStatus] | None = None, limit: int = 50, offset: int = 0,
        oldest_first: bool = False, tenant: str | None = None,
    ) -> tuple[list[JobRecord], int]:
        """A page of jobs (of one tenant, if given) ordered by creation time, and how many match in all."""

    @abstractmethod
    def page_after(
        self, statuses: Collection[JobStatus] | None, tenant: str | None, oldest_first: bool, after: Cursor | None,
        limit: int,
    ) -> tuple[list[JobRecord], Cursor | None]:
        """Up to `limit` matching jobs that come after `after` in creation order (from the start if None), and
        the cursor to go on from, None once there are no more."""

    @abstractmethod
    def update(self, job_id: str, change: Change, durable: bool = True) -> JobRecord | None:
        """Apply `change` atomically; return the stored result, or None if the job is gone or `change`
        declined. `durable=False`: a change that may be lost to a power cut (a heartbeat), written without
        waiting for the disk where the store can tell the difference."""

    @abstractmethod
    def delete(self, job_id: str, only: Collection[JobStatus] = FINISHED_STATUSES) -> bool:
        """Remove the record if its status is one of `only`."""

    @abstractmethod
    def with_digest(self, tenant: str, digest: str, statuses: Collection[JobStatus]) -> list[JobRecord]:
        """The tenant's jobs of one request digest in these statuses, newest first (an index, not a scan)."""

    @abstractmethod
    def claim_key(self, tenant: str, key: str, fingerprint: str, owner: str,
                  hold_seconds: float) -> IdempotencyRecord | None:
        """Atomically: None when the tenant's idempotency `key` was free (or its record expired), which it now is
        `owner`'s for `hold_seconds`; else the live record, for the caller to replay or refuse."""

    @abstractmethod
    def settle_key(self, tenant: str, key: str, owner: str, job_id: str, status_code: int,
                   ttl_seconds: float) -> None:
        """Record the answer to `owner`'s request under `key`, kept `ttl_seconds`; a no-op once the key is no
        longer `owner`'s (its hold ran out and another request took it)."""

    @abstractmethod
    def release_key(self, tenant: str, key: str, owner: str) -> None:
        """Forget `key` while `owner` still processes it (its request failed: the key may be sent again)."""

    @abstractmethod
    def acquire_lock(self, name: str, owner: str, seconds: float) -> bool:
        """Take the named lock for `seconds` of the store's clock, or renew it when `owner` holds it already;
        False while someone else holds it. A holder that dies loses it when the time runs out."""

    @abstractmethod
    def release_lock(self, name: str, owner: str) -> None:
        """Give the lock up, if `owner` still holds it."""

    @abstractmethod
    def worker_seen(self, worker: str, seconds: float) -> None:
        """Record that `worker` is alive for the next `seconds` of the store's clock (0: it has stopped)."""

    @abstractmethod
    def live_workers(self) -> list[str]:
        """The workers seen within the time they announced, by the store's clock."""

    @abstractmethod
    def now(self) -> float:
        """The store's clock (epoch seconds); leases are compared against it, never a worker's clock."""

    @abstractmethod
    def ping(self) -> None:
        """Raise if the store cannot be reached."""

    @abstractmethod
    def due_webhooks(self, now: float, limit: int) -> list[str]:
        """Ids of up to `limit` jobs whose callback is pending and due by `now` (the store's clock), soonest
        first. An index kept by every write of a job (`webhook_due`), so finding them reads no other job."""

    @staticmethod
    def webhook_due(job: JobRecord) -> float | None:
        """The job's place in the index of due callbacks: when its pending delivery's next attempt is due (epoch
        seconds), or None when it has no pending delivery."""
        hook = job.webhook
        if hook is None or hook.state != "pending" or hook.next_attempt_at is None:
            return None
        return hook.next_attempt_at.timestamp()

    def hold_open(self) -> None:  # noqa: B027 - optional hook
        """Keep what the store needs open until `close`, for a process that uses the store all its life (the
        API)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @contextmanager
    def locked(self, name: str, seconds: float, wait: float, poll: float = 0.01) -> Iterator[None]:
        """Hold the named lock around a block (for at most `seconds`, should the holder die), waiting up to `wait`
        seconds for it; `LockBusy` after that."""
        owner, deadline, pause = uuid.uuid4().hex, time.monotonic() + wait, poll
        while not self.acquire_lock(name, owner, seconds):
            if time.monotonic() >= deadline:
                raise LockBusy(name)
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
        try:
            yield
        finally:
            self.release_lock(name, owner)

    def all_jobs(self, statuses: Collection[JobStatus] | None = None, tenant: str | None = None,
                 oldest_first: bool = False) -> Iterator[JobRecord]:
        """Every matching job, a page at a time. Each page starts after the last job of the one before, not at
        an offset, so jobs that leave the listing meanwhile (finished, recovered, deleted) cannot make it skip
        others; a job that was listed all along is seen exactly once, jobs created meanwhile may or may not be."""
        after: Cursor | None = None
        while True:
            page, after = self.page_after(statuses, tenant, oldest_first, after, PAGE)
            yield from page
            if after is None:
                return

    def artifact_bytes(self, tenant: str) -> int:
        """Bytes of results a tenant keeps: its succeeded jobs' artifacts."""
        return sum(job.artifact_bytes for job in self.all_jobs([JobStatus.succeeded], tenant=tenant))

    # --- state rules shared by all backends -------------------------------------------------------------

    def claim(self, job_id: str, worker: str, lease_seconds: float) -> JobRecord | None:
        """Queued -> running for `worker`, with a fresh lease and the next attempt number."""

        def change(job: JobRecord, now: float) -> JobRecord | None:
            if job.status is not JobStatus.queued:
                return None
            return job.model_copy(update={
                "status": JobStatus.running, "attempt": job.attempt + 1, "worker": worker,
                "started_at": utcnow(), "lease_expires_at": now + lease_seconds,
                "progress": job.progress.restarted(), "error": None,
            })

        return self.update(job_id, change)

    def claim_next(self, worker: str, lease_seconds: float) -> JobRecord | None:
        """Claim the oldest queued job (embedded mode has no broker; the store is the queue)."""
        while True:
            queued, _ = self.list([JobStatus.queued], limit=10, oldest_first=True)
            if not queued:
                return None
            for job in queued:
                claimed = self.claim(job.id, worker, lease_seconds)
                if claimed is not None:
                    return claimed

    def heartbeat(
        self, job_id: str, attempt: int, lease_seconds: float | None, progress: Progress | None = None,
    ) -> JobRecord | None:
        """Renew the lease of `attempt` (when `lease_seconds` is given) and store its progress; returns the
        record (whose `cancel_requested` the worker obeys), or None when the run is no longer this attempt's."""

        def change(job: JobRecord, now: float) -> JobRecord | None:
            if job.status is not JobStatus.running or job.attempt != attempt:
                return None
            update: dict[str, object] = {}
            if lease_seconds is not None:
                update["lease_expires_at"] = now + lease_seconds
            if progress is not None:
                update["progress"] = progress
            return job.model_copy(update=update)

        return self.update(job_id, change, durable=False)

    def finish(self, job_id: str, attempt: int, status: JobStatus, **fields: object) -> JobRecord | None:
        """End `attempt` with a final status, or put it back in the queue (status=queued)."""

        def change(job: JobRecord, now: float) -> JobRecord | None:
            if job.status is not JobStatus.running or job.attempt != attempt:
                return None
            update: dict[str, object] = {"status": status, "lease_expires_at": None, **fields}
            update.setdefault("queued_at" if status is JobStatus.queued else "finished_at", utcnow())
            if status in FINISHED_STATUSES:
                update["webhook"] = pending_delivery(job, now)
            return job.model_copy(update=update)

        return self.update(job_id, change)

    def republish(self, job_id: str, grace_seconds: float) -> JobRecord | None:
        """A job still queued `grace_seconds` after it was last published (by the store's clock) may have lost
        its message: record now as its publishing time and return it, for the caller to publish again. Of many
        reapers trying at once exactly one gets it, once per grace period; the claim stays the only gate, so
        the extra message is harmless if the first one was not lost after all."""

        def change(job: JobRecord, now: float) -> JobRecord | None:
            if job.status is not JobStatus.queued or job.queued_at.timestamp() > now - grace_seconds:
                return None
            return job.model_copy(update={"queued_at": datetime.fromtimestamp(now, UTC)})

        return self.update(job_id, change)

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """A queued job is cancelled at once; a running one is flagged and stopped by its worker."""

        def change(job: JobRecord, now: float) -> JobRecord | None:
            if job.status is JobStatus.queued:
                return job.model_copy(update={
                    "status": JobStatus.cancelled, "cancel_requested": True, "finished_at": utcnow(),
                    "webhook": pending_delivery(job, now),
                })
            if job.status is JobStatus.running:
                return job.model_copy(update={"cancel_requested": True})
            return None

        return self.update(job_id, change)

    def recover(self, job_id: str, max_recoveries: int) -> JobRecord | None:
        """A running job whose lease ran out lost its worker: queue it again (or end it if it was being
        cancelled or has been lost too often). The attempt check inside `update` makes this safe to run
        from many reapers at once."""

        def change(job: JobRecord, now: float) -> JobRecord | None:
            if job.status is not JobStatus.running or (job.lease_expires_at or 0) > now:
                return None
            lost = f"worker {job.worker} stopped renewing its lease (attempt {job.attempt})"
            update: dict[str, object] = {"lease_expires_at": None, "notes": [*job.notes, lost]}
            if job.cancel_requested:
                update.update(status=JobStatus.cancelled, finished_at=utcnow())
            elif job.recoveries >= max_recoveries:
                update.update(status=JobStatus.failed, finished_at=utcnow(), error=Problem(
                    Problems.WORKER_LOST, f"the job lost its worker {job.recoveries + 1} times; giving up",
                ).to_dict())
            else:
                update.update(status=JobStatus.queued, queued_at=utcnow(), recoveries=job.recoveries + 1,
                              progress=job.progress.restarted())
            if update["status"] in FINISHED_STATUSES:
                update["webhook"] = pending_delivery(job, now)
            return job.model_copy(update=update)

        return self.update(job_id, change)

