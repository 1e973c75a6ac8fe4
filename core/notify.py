"""Delivering job callbacks. Every process that runs the maintenance loop (each API process, each Celery
worker) runs a `Notifier`: a thread reads the due deliveries from the store's index every poll interval
(`JobStore.due_webhooks`, no scan of the jobs) and hands them to a few sender threads (so a receiver that does
not answer holds up one of them, not every callback); a sender takes an attempt by a compare-and-set on the
job, sends it and records the outcome, fenced by the attempt number.

Taking an attempt moves the delivery's `next_attempt_at` a lease ahead: no other process takes the delivery
until then, and if this one dies mid-attempt, another takes it over once the lease has passed. The delivery is
therefore at least once, with the same `webhook-id` on every attempt, and the record survives any process.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

from adapter_merge.core.context import JobContext
from adapter_merge.core.jobs import JobRecord
from adapter_merge.core.settings import Settings
from adapter_merge.core.store import STORE_UNAVAILABLE, JobStore
from adapter_merge.core.webhooks import (
    CallbackRefused,
    HostPolicy,
    event_body,
    resolve_callback,
    signed_headers,
)

log = logging.getLogger(__name__)
MAX_BACKOFF_SECONDS = 3600.0
USER_AGENT = "adapter-merge-webhooks"


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended: the HTTP status (None when there was no answer) and whether to try again."""

    status: int | None
    error: str | None
    retry: bool

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class Notifier:
    """The callback deliveries of one process; needs the signing secret (without it the API accepts none)."""

    def __init__(self, store: JobStore, settings: Settings, key: bytes) -> None:
        self.store, self.settings, self.key = store, settings, key
        self.policy = HostPolicy.parse(self.settings.webhook_allowed_hosts)
        # No proxies from the environment (they would connect elsewhere than the address checked), no redirects,
        # and a connection of its own for every attempt: a kept one, found by address, could carry another name's
        # request over a TLS session checked for the first name.
        self.http = httpx.Client(timeout=self.settings.webhook_timeout_seconds, follow_redirects=False,
                                 trust_env=False, limits=httpx.Limits(max_keepalive_connections=0),
                                 headers={"user-agent": USER_AGENT})
        self._stop = threading.Event()
        self._queue: queue.Queue[str] = queue.Queue()
        self._in_flight: set[str] = set()
        """Jobs handed to this process's senders and not done yet."""
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._sweep, name="merge-webhooks", daemon=True), *(
            threading.Thread(target=self._send_queued, name=f"merge-webhooks-{index}", daemon=True)
            for index in range(self.settings.webhook_concurrency))]

    @classmethod
    def of(cls, context: JobContext) -> Notifier | None:
        """This process's notifier, or None when no secret is configured."""
        key = context.settings.webhook_key
        return None if key is None else cls(context.store, context.settings, key)

    @property
    def lease_seconds(self) -> float:
        """How long one attempt may take before another process may take the delivery over: connecting,
        sending and waiting for the answer each have the timeout, and resolving the name gets one more."""
        return 4 * self.settings.webhook_timeout_seconds

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking attempts; an attempt still running when the process ends is taken over by another
        process once its lease has passed."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout / len(self._threads))
        self.http.close()

    def _sweep(self) -> None:
        while not self._stop.is_set():
            try:
                self.queue_due()
            except STORE_UNAVAILABLE as error:
                log.warning("webhooks: job store unavailable (%s); retrying", error)
            except Exception:  # a bug must not end deliveries for good
                log.exception("webhooks: looking for due callbacks failed; retrying")
            self._stop.wait(self.settings.poll_seconds)

    def queue_due(self) -> list[str]:
        """Hand callbacks due now to the idle senders (as many as are idle); returns their jobs."""
        with self._lock:
            busy = set(self._in_flight)
        idle = self.settings.webhook_concurrency - len(busy)
        if idle <= 0:
            return []
        due = [job_id for job_id in self.store.due_webhooks(self.store.now(), idle + len(busy))
               if job_id not in busy][:idle]
        with self._lock:
            self._in_flight.update(due)
        for job_id in due:
            self._queue.put(job_id)
        return due

    def _send_queued(self) -> None:
        while not self._stop.is_set():
            try:
                job_id = self._queue.get(timeout=self.settings.poll_seconds)
            except queue.Empty:
                continue
            try:
                self.deliver(job_id)
            except STORE_UNAVAILABLE as error:  # the attempt, if taken, is taken over after its lease
                log.warning("webhooks: job %s: job store unavailable (%s)", job_id, error)
            except Exception:
                log.exception("webhooks: job %s: delivery failed", job_id)
            finally:
                with self._lock:
                    self._in_flight.discard(job_id)

    def deliver(self, job_id: str) -> JobRecord | None:
        """One attempt at the job's callback, if it is due and no other process has taken it; the job as
        recorded afterwards (None if not taken, or superseded by another process's attempt; failed without an
        attempt past the retry time)."""
        lease, bound = self.lease_seconds, self.settings.webhook_retry_seconds
        job = self.store.update(job_id, lambda current, now: _taken(current, now, lease, bound))
        if job is None or job.webhook is None or job.webhook.state != "pending":
            return job
        attempt = job.webhook.attempts
        outcome = self.send(job)
        recorded = self.store.update(job_id, lambda current, now: self._recorded(current, now, attempt, outcome))
        if recorded is not None and recorded.webhook is not None:
            hook = recorded.webhook
            level = logging.WARNING if hook.state == "failed" else logging.INFO
            log.log(level, "job %s: callback %s attempt %d: %s; %s", job_id, hook.id, attempt,
                    outcome.error or f"HTTP {outcome.status}", hook.state)
        return recorded

    def send(self, job: JobRecord) -> Outcome:
        """POST the signed event to the callback URL, connecting to the address checked just now."""
        assert job.webhook is not None and job.request.callback_url is not None
        try:
            target = resolve_callback(job.request.callback_url, self.policy)
        except CallbackRefused as error:
            return Outcome(None, f"refused: {error}", retry=False)
        except OSError as error:
            return Outcome(None, f"the host does not resolve ({error.strerror or error})", retry=True)
        body = event_body(job, self.settings.public_url)
        headers = signed_headers(self.key, job.webhook.id, int(time.time()), body)
        request = self.http.build_request(
            "POST", target.url.copy_with(host=str(target.address)), content=body,
            headers={**headers, "host": target.url.netloc.decode("ascii")},
            extensions={"sni_hostname": target.url.raw_host.decode("ascii")})  # TLS checks the name, not the address
        try:
            response = self.http.send(request, stream=True)  # the answer's body is not needed: never read
            response.close()
        except httpx.TransportError as error:
            return Outcome(None, f"{type(error).__name__}: {error}" if str(error) else type(error).__name__,
                           retry=True)
        status = response.status_code
        if 200 <= status < 300:
            return Outcome(status, None, retry=False)
        return Outcome(status, f"HTTP {status}", retry=status == 429 or status >= 500)

    def _recorded(self, job: JobRecord, now: float, attempt: int, outcome: Outcome) -> JobRecord | None:
        """The outcome of `attempt`, unless another attempt has been taken meanwhile: delivered; due again
        after a backoff; or failed (a refusal, or the next try would fall past the retry time)."""
        hook = job.webhook
        if hook is None or hook.state != "pending" or hook.attempts != attempt:
            return None
        fields: dict[str, object] = {"last_status": outcome.status, "last_error": outcome.error}
        if outcome.delivered:
            fields.update(state="delivered", delivered_at=_moment(now), next_attempt_at=None)
        else:
            retry_at = now + backoff(self.settings.webhook_backoff_seconds, attempt)
            bound = self.settings.webhook_retry_seconds
            if outcome.retry and retry_at <= hook.created_at.timestamp() + bound:
                fields["next_attempt_at"] = _moment(retry_at)
            else:
                if outcome.retry:
                    fields["last_error"] = f"{outcome.error}; gave up after {attempt} attempts, the retry time " \
                                           f"(MERGE_WEBHOOK_RETRY_SECONDS={bound:g}) being over"
                fields.update(state="failed", next_attempt_at=None)
        return job.model_copy(update={"webhook": hook.model_copy(update=fields)})


def backoff(first: float, attempt: int) -> float:
    """Seconds before the retry after `attempt` (1, 2, ...): doubling from `first`, at most an hour, with
    jitter (a random half of it), so receivers coming back from an outage are not hit by all at once."""
    return min(MAX_BACKOFF_SECONDS, first * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def _taken(job: JobRecord, now: float, lease: float, bound: float) -> JobRecord | None:
    """The next attempt, taken by the caller: counted, and the delivery not due again for a lease. Past the
    retry time and a lease (attempts whose process died record no outcome, so nothing else would stop them),
    the callback fails instead."""
    hook = job.webhook
    if hook is None or hook.state != "pending" or hook.next_attempt_at is None \
            or hook.next_attempt_at.timestamp() > now:
        return None
    if now > hook.created_at.timestamp() + bound + lease:
        return job.model_copy(update={"webhook": hook.model_copy(update={
            "state": "failed", "next_attempt_at": None, "last_error": f"gave up after {hook.attempts} attempts, the "
            f"last of which recorded no outcome (its process stopped), the retry time being over"})})
    return job.model_copy(update={"webhook": hook.model_copy(update={
        "attempts": hook.attempts + 1, "next_attempt_at": _moment(now + lease)})})


def _moment(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
