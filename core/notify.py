"""Delivering job callbacks. Every process that runs the maintenance loop (each API process, each Celery
worker) runs a `Notifier` thread: it reads the due deliveries from the store's index every poll interval
(`JobStore.due_webhooks`, no scan of the jobs), takes one attempt at a time by a compare-and-set on the job,
sends it and records the outcome, fenced by the attempt number.

Taking an attempt moves the delivery's `next_attempt_at` a lease ahead: no other process takes the delivery
until then, and if this one dies mid-attempt, another takes it over once the lease has passed. The delivery is
therefore at least once, with the same `webhook-id` on every attempt, and the record survives any process.
"""

from __future__ import annotations

import logging
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
BATCH = 50
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
        # No proxies from the environment (they would connect elsewhere than the address checked), no redirects.
        self.http = httpx.Client(timeout=self.settings.webhook_timeout_seconds, follow_redirects=False,
                                 trust_env=False, headers={"user-agent": USER_AGENT})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="merge-webhooks", daemon=True)

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
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self.http.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.deliver_due() == BATCH:
                    continue  # more may be due at once
            except STORE_UNAVAILABLE as error:
                log.warning("webhooks: job store unavailable (%s); retrying", error)
            except Exception:  # a bug must not end deliveries for good
                log.exception("webhooks: delivery pass failed; retrying")
            self._stop.wait(self.settings.poll_seconds)

    def deliver_due(self) -> int:
        """One attempt at each delivery due now (up to `BATCH`); returns how many were looked at."""
        due = self.store.due_webhooks(self.store.now(), BATCH)
        for job_id in due:
            if self._stop.is_set():
                break
            self.deliver(job_id)
        return len(due)

    def deliver(self, job_id: str) -> JobRecord | None:
        """One attempt at the job's callback, if it is due and no other process has taken it; the job as
        recorded afterwards (None if not taken, or superseded by another process's attempt)."""
        lease = self.lease_seconds
        job = self.store.update(job_id, lambda current, now: _taken(current, now, lease))
        if job is None or job.webhook is None:
            return None
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
        url = job.request.callback_url
        try:
            target = resolve_callback(url, self.policy)
        except CallbackRefused as error:
            return Outcome(None, f"refused: {error}", retry=False)
        except OSError as error:
            return Outcome(None, f"the host does not resolve ({error.strerror or error})", retry=True)
        body = event_body(job)
        headers = signed_headers(self.key, job.webhook.id, int(time.time()), body)
        original = httpx.URL(url)
        request = self.http.build_request(
            "POST", original.copy_with(host=str(target.address)), content=body,
            headers={**headers, "host": original.netloc.decode("ascii")},
            extensions={"sni_hostname": target.host})  # TLS checks the certificate against the name, not the address
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


def _taken(job: JobRecord, now: float, lease: float) -> JobRecord | None:
    """The next attempt, taken by the caller: counted, and the delivery not due again for a lease."""
    hook = job.webhook
    if hook is None or hook.state != "pending" or hook.next_attempt_at is None \
            or hook.next_attempt_at.timestamp() > now:
        return None
    return job.model_copy(update={"webhook": hook.model_copy(update={
        "attempts": hook.attempts + 1, "next_attempt_at": _moment(now + lease)})})


def _moment(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)
