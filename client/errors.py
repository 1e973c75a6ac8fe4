"""What can go wrong, as exceptions to catch by kind: each API error carries the server's problem document
(RFC 9457), each job outcome the job."""

from __future__ import annotations

from typing import Any

import httpx

from adapter_merge.client.models import Job

PROBLEM_TYPE_PREFIX = "urn:adapter-merge:problem:"


class ApiError(Exception):
    """The service refused a request; `problem` is its answer (`type`, `title`, `status`, `detail`, and
    members such as `field`, `ref` or `errors` naming what is at fault)."""

    def __init__(self, problem: dict[str, Any], status: int, retry_after: int | None = None) -> None:
        self.problem = problem
        self.status = status
        self.retry_after = retry_after
        """Seconds the service asked to wait before trying again (its Retry-After header), if it said."""
        super().__init__(self.detail)

    @property
    def detail(self) -> str:
        return str(self.problem.get("detail") or self.problem.get("title") or f"HTTP {self.status}")

    @property
    def kind(self) -> str:
        """The problem's slug (`job-not-found`, `validation-error`, ...): what to match on, not the detail."""
        return str(self.problem.get("type", "")).removeprefix(PROBLEM_TYPE_PREFIX)


class BadRequest(ApiError):
    """400: the body is not valid JSON."""


class Unauthorized(ApiError):
    """401: no token, or one the service does not accept."""


class Forbidden(ApiError):
    """403: the token's role may not do this."""


class NotFound(ApiError):
    """404: no such job (or not the caller's tenant's) or artifact."""


class Conflict(ApiError):
    """409: the job's status does not allow it (cancel a finished job, delete an active one, download early)."""


class ValidationFailed(ApiError):
    """422: the request or its inputs cannot work; `errors` lists every invalid field of a validation-error."""

    @property
    def errors(self) -> list[dict[str, Any]]:
        return list(self.problem.get("errors") or ())


class RateLimited(ApiError):
    """429: the tenant has too many active jobs; see `retry_after`."""


class Unavailable(ApiError):
    """503: the store, queue, a registry or the inputs' check is not available now; see `retry_after`."""


class ServerError(ApiError):
    """5xx: the service failed."""


_BY_STATUS: dict[int, type[ApiError]] = {400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound,
                                         409: Conflict, 422: ValidationFailed, 429: RateLimited, 503: Unavailable}


def error_for(response: httpx.Response) -> ApiError:
    """The typed error of an answer that is not a success (its body read already)."""
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        problem = {"title": response.reason_phrase, "status": response.status_code,
                   "detail": f"HTTP {response.status_code} {response.reason_phrase}: {response.text[:200]}"}
    retry_after = response.headers.get("retry-after", "")
    status = response.status_code
    kind = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    return kind(problem, status, int(retry_after) if retry_after.isdigit() else None)


class JobNotSucceeded(Exception):
    """The job ended (or stands) otherwise than succeeded; `job` is how it was last seen."""

    def __init__(self, job: Job, message: str) -> None:
        self.job = job
        super().__init__(message)


class JobFailed(JobNotSucceeded):
    """The job failed; `problem` says why (e.g. `numeric-error`, `download-failed`)."""

    def __init__(self, job: Job) -> None:
        self.problem = job.error or {}
        super().__init__(job, f"job {job.id} failed: {self.problem.get('detail', 'no detail')}")


class JobCancelled(JobNotSucceeded):
    def __init__(self, job: Job) -> None:
        super().__init__(job, f"job {job.id} was cancelled")


class WaitTimeout(TimeoutError):
    """The job had not finished within the time given; `job` is how it was last seen."""

    def __init__(self, job: Job, timeout: float) -> None:
        self.job = job
        super().__init__(f"job {job.id} still {job.status} after {timeout:g} s")


class ChecksumMismatch(Exception):
    """A downloaded file's sha256 is not the one the service advertised; nothing was left under its name."""

    def __init__(self, path: str, expected: str, actual: str) -> None:
        self.path, self.expected, self.actual = path, expected, actual
        super().__init__(f"{path}: sha256 {actual} does not match the advertised {expected}; the file was removed, "
                         "download it again")
