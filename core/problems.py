"""The problem catalogue: every kind of failure a client can be told about, in one table.

A `Problem` is an exception that carries an RFC 9457 problem document's facts (its type from the table, the
detail, and members naming what is at fault). The API answers with it, a failed job stores it; neither needs
to know HTTP to raise one, and nobody finds a problem's kind by reading its message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adapter_merge.worker.engine.errors import (
    DISK_FULL_ERRNOS,
    InputError,
    MergeError,
    NumericError,
    StorageError,
    UnsupportedOptionError,
)

PROBLEM_TYPE_PREFIX = "urn:adapter-merge:problem:"


@dataclass(frozen=True)
class ProblemType:
    slug: str
    status: int
    title: str

    @property
    def uri(self) -> str:
        return PROBLEM_TYPE_PREFIX + self.slug


class Problems:
    """Every problem type the service uses; `openapi.json` and the README list the same."""

    MALFORMED_JSON = ProblemType("malformed-json", 400, "Malformed JSON")
    VALIDATION_ERROR = ProblemType("validation-error", 422, "Invalid request")
    REQUEST_TOO_LARGE = ProblemType("request-too-large", 413, "Request too large")
    REQUEST_TIMEOUT = ProblemType("request-timeout", 408, "Request timeout")
    UNSUPPORTED_MEDIA_TYPE = ProblemType("unsupported-media-type", 415, "Unsupported media type")
    REFERENCE_INVALID = ProblemType("reference-invalid", 422, "Unusable reference")
    REFERENCE_OUTSIDE_ROOTS = ProblemType("reference-outside-roots", 422, "Unusable reference")
    REFERENCE_NOT_FOUND = ProblemType("reference-not-found", 422, "Unusable reference")
    REFERENCE_NOT_A_FOLDER = ProblemType("reference-not-a-folder", 422, "Unusable reference")
    REFERENCE_FORBIDDEN = ProblemType("reference-forbidden", 422, "Reference not allowed")
    CALLBACK_REFUSED = ProblemType("callback-refused", 422, "Callback URL not allowed")
    REGISTRY_UNAVAILABLE = ProblemType("registry-unavailable", 503, "Registry unavailable")
    DOWNLOAD_CORRUPT = ProblemType("download-corrupt", 502, "Downloaded file does not match its registry")
    DOWNLOAD_FAILED = ProblemType("download-failed", 502, "Download failed")
    PUBLISH_FAILED = ProblemType("publish-failed", 502, "Publishing failed")
    PUBLISH_CONFLICT = ProblemType("publish-conflict", 409, "Publish target holds another model")
    REFERENCE_WRONG_KIND = ProblemType("reference-wrong-kind", 422, "Unusable reference")
    INPUTS_DO_NOT_FIT = ProblemType("inputs-do-not-fit", 422, "Inputs cannot be merged")
    UNSUPPORTED_ADAPTER = ProblemType("unsupported-adapter", 422, "Inputs cannot be merged")
    NUMERIC_ERROR = ProblemType("numeric-error", 422, "Merge produced invalid numbers")
    NOT_FOUND = ProblemType("not-found", 404, "Not found")
    METHOD_NOT_ALLOWED = ProblemType("method-not-allowed", 405, "Method not allowed")
    UNAUTHORIZED = ProblemType("unauthorized", 401, "Authentication required")
    FORBIDDEN = ProblemType("forbidden", 403, "Not allowed")
    AUTH_UNAVAILABLE = ProblemType("auth-unavailable", 503, "Identity provider unavailable")
    TOO_MANY_ACTIVE_JOBS = ProblemType("too-many-active-jobs", 429, "Too many active jobs")
    ARTIFACT_QUOTA_EXCEEDED = ProblemType("artifact-quota-exceeded", 507, "Artifact quota exceeded")
    JOB_NOT_FOUND = ProblemType("job-not-found", 404, "Unknown job")
    ARTIFACT_NOT_FOUND = ProblemType("artifact-not-found", 404, "Unknown artifact")
    ARTIFACT_GONE = ProblemType("artifact-gone", 404, "Artifact gone")
    JOB_FINISHED = ProblemType("job-finished", 409, "Job already finished")
    JOB_ACTIVE = ProblemType("job-active", 409, "Job still active")
    JOB_NOT_SUCCEEDED = ProblemType("job-not-succeeded", 409, "No artifacts")
    RANGE_NOT_SATISFIABLE = ProblemType("range-not-satisfiable", 416, "Range not satisfiable")
    STORE_UNAVAILABLE = ProblemType("store-unavailable", 503, "Service unavailable")
    PREFLIGHT_TIMEOUT = ProblemType("preflight-timeout", 503, "Inputs could not be checked in time")
    QUEUE_UNAVAILABLE = ProblemType("queue-unavailable", 503, "Queue unavailable")
    NOT_READY = ProblemType("not-ready", 503, "Not ready")
    WORKER_LOST = ProblemType("worker-lost", 500, "Worker lost")
    STORAGE_ERROR = ProblemType("storage-error", 500, "Storage error")
    INTERNAL_ERROR = ProblemType("internal-error", 500, "Internal error")
    STORAGE_FULL = ProblemType("storage-full", 507, "Insufficient storage")
    IDEMPOTENCY_KEY_REUSED = ProblemType("idempotency-key-reused", 422, "Idempotency key used for another request")
    IDEMPOTENCY_KEY_IN_USE = ProblemType("idempotency-key-in-use", 409, "Request with this idempotency key in progress")
    SUBMISSION_BUSY = ProblemType("submission-busy", 503, "Identical submission in progress")

    @classmethod
    def all(cls) -> list[ProblemType]:
        return [value for value in vars(cls).values() if isinstance(value, ProblemType)]

    @classmethod
    def by_slug(cls, slug: str) -> ProblemType:
        return next(kind for kind in cls.all() if kind.slug == slug)


class Problem(Exception):
    """Raise anywhere to report a problem; `members` (field, ref, errors, ...) say what is at fault."""

    def __init__(self, kind: ProblemType, detail: str, *, retry_after: int | None = None,
                 headers: dict[str, str] | None = None, **members: Any) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.retry_after = retry_after
        """Seconds after which trying again may work (a 503's Retry-After)."""
        self.headers = headers or {}
        """Protocol headers that belong to the problem (e.g. a 416's Content-Range)."""
        self.members = {name: value for name, value in members.items() if value is not None}

    @property
    def status(self) -> int:
        return self.kind.status

    def about(self, field: str) -> Problem:
        """This problem, said of request field `field` (raised where the field is known, e.g. by a download)."""
        if "field" not in self.members:
            self.members["field"] = field
            if not self.detail.startswith(f"{field}:"):
                self.detail = f"{field}: {self.detail}"
                self.args = (self.detail,)
        return self

    def to_dict(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.kind.uri, "title": self.kind.title, "status": self.status,
                                "detail": self.detail}
        if instance:
            body["instance"] = instance
        body.update(self.members)
        return body


_ENGINE_PROBLEMS: list[tuple[type[MergeError], ProblemType]] = [
    (UnsupportedOptionError, Problems.UNSUPPORTED_ADAPTER),  # before InputError, its base class
    (InputError, Problems.INPUTS_DO_NOT_FIT),
    (NumericError, Problems.NUMERIC_ERROR),
    (StorageError, Problems.STORAGE_ERROR),
]


DISK_FULL_DETAIL = ("the server's disk filled up while the merged model was written; the partial output was "
                    "removed. Free space (delete finished jobs) and submit it again")


def storage_detail(error: BaseException) -> str:
    """What clients are told of a failure of the server's own storage: what failed, never where."""
    if getattr(error, "disk_full", False) or (isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS):
        return DISK_FULL_DETAIL
    cause = error if isinstance(error, OSError) else error.__cause__
    reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else type(error).__name__
    return f"the server could not write the merged model: {reason}"


def engine_problem_type(error: MergeError) -> ProblemType:
    """The catalogue entry for an engine error, by its class (and, for storage, whether the disk was full)."""
    if isinstance(error, StorageError) and error.disk_full:
        return Problems.STORAGE_FULL
    return next((kind for cls, kind in _ENGINE_PROBLEMS if isinstance(error, cls)), Problems.INTERNAL_ERROR)
