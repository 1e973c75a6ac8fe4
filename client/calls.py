"""The API's requests and the reading of their answers, written once for the blocking and the asyncio client
(each only sends them): what to send for each operation, how long to wait between polls, and when a
finished job means success."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from adapter_merge.client.errors import JobCancelled, JobFailed, WaitTimeout, error_for
from adapter_merge.client.models import Job

DEFAULT_TIMEOUT = 30.0
PAGE_SIZE = 100
"""Jobs per listing request (the service allows up to 500)."""


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    params: dict[str, Any] | None = None
    json: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def http_options(url: str, token: str | None, timeout: float) -> dict[str, Any]:
    """What httpx.Client and httpx.AsyncClient are both built with."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return {"base_url": url.rstrip("/"), "headers": headers, "timeout": timeout}


def checked(response: httpx.Response) -> httpx.Response:
    """The response if it is a success, else its typed error (the body must have been read)."""
    if response.is_success:
        return response
    raise error_for(response)


def submit(base: str, adapters: Sequence[str], *, weights: Sequence[float] | None, output_dtype: str | None,
           max_shard_size: int | str | None, publish: str | dict[str, Any] | None, callback_url: str | None,
           reuse: bool, idempotency_key: str | None) -> Call:
    """POST /merge; options left at None are not sent, so the service's defaults apply."""
    if weights is not None and len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights for {len(adapters)} adapters")
    body: dict[str, Any] = {"base_model": base, "adapters": [
        {"ref": ref, "weight": weight} for ref, weight in zip(adapters, weights, strict=True)
    ] if weights is not None else list(adapters)}
    options = {"output_dtype": output_dtype, "max_shard_size": max_shard_size, "callback_url": callback_url,
               "publish": {"to": publish} if isinstance(publish, str) else publish}
    body.update({name: value for name, value in options.items() if value is not None})
    if not reuse:
        body["reuse"] = False
    return Call("POST", "/merge", json=body,
                headers={"Idempotency-Key": idempotency_key} if idempotency_key else {})


def get(job_id: str) -> Call:
    return Call("GET", f"/jobs/{job_id}")


def page(status: str | Sequence[str] | None, limit: int, offset: int) -> Call:
    statuses = [status] if isinstance(status, str) else list(status or ())
    return Call("GET", "/jobs", params={"status": statuses, "limit": limit, "offset": offset})


def cancel(job_id: str) -> Call:
    return Call("POST", f"/jobs/{job_id}/cancel")


def delete(job_id: str) -> Call:
    return Call("DELETE", f"/jobs/{job_id}")


def job_id(job: Job | str) -> str:
    return job if isinstance(job, str) else job.id


class Listing:
    """Pages of GET /jobs, newest first, until `limit` jobs or the end. A job that moves to a later page
    while listing (newer ones arrived) is given once."""

    def __init__(self, status: str | Sequence[str] | None, limit: int | None) -> None:
        self.status, self.limit = status, limit
        self.offset, self.seen, self.done = 0, set[str](), False

    def next_call(self) -> Call:
        size = PAGE_SIZE if self.limit is None else max(1, min(PAGE_SIZE, self.limit - len(self.seen)))
        return page(self.status, size, self.offset)

    def read(self, body: dict[str, Any]) -> list[Job]:
        """The new jobs of one page; sets `done` after the last page or the limit."""
        items = body["items"]
        self.offset += len(items)
        jobs = [Job.from_json(item) for item in items if item["id"] not in self.seen]
        if self.limit is not None:
            jobs = jobs[: self.limit - len(self.seen)]
        self.seen.update(job.id for job in jobs)
        self.done = not items or self.offset >= body["total"] or (self.limit is not None
                                                                  and len(self.seen) >= self.limit)
        return jobs


class Poll:
    """When to ask again while waiting for a job: soon at first, then backing off to `max_interval`."""

    def __init__(self, timeout: float | None, interval: float = 0.2, max_interval: float = 5.0) -> None:
        self.timeout, self.delay, self.max_interval = timeout, interval, max_interval
        self.deadline = None if timeout is None else time.monotonic() + timeout

    @staticmethod
    def outcome(job: Job) -> Job | None:
        """The job if it succeeded, None while it is queued or running; raises if it failed or was cancelled."""
        if job.status == "failed":
            raise JobFailed(job)
        if job.status == "cancelled":
            raise JobCancelled(job)
        return job if job.status == "succeeded" else None

    def pause(self, job: Job) -> float:
        """Seconds to wait before the next poll; raises WaitTimeout once the time is up."""
        delay, self.delay = self.delay, min(self.max_interval, self.delay * 1.5)
        if self.deadline is None:
            return delay
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout(job, self.timeout or 0.0)
        return min(delay, remaining)
