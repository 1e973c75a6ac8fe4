"""A merge job as stored and as shown: its status, the request, progress, timings, metrics and results.

The API serves these models directly (adding only download URLs), the runner and the reaper write them;
timings and metrics reject unknown keys, so a misspelt one is an error rather than a value that vanishes.
Bookkeeping that clients never see (lease, attempt fencing) lives on `JobRecord` only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapter_merge.core.request import MergeRequest
from adapter_merge.core.sources.base import PinnedInput


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


DEFAULT_TENANT = "default"
"""The tenant of jobs submitted without authentication (MERGE_AUTH=none) or before tenants existed."""
ACTIVE_STATUSES = frozenset({JobStatus.queued, JobStatus.running})
FINISHED_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Strict(BaseModel):
    """Unknown keys are errors; in responses every field is present, so the schema says so."""

    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)


Phase = Literal["queued", "downloading", "merging", "publishing"]


class Progress(_Strict):
    """How far the job is. While `downloading`, the bytes count the remote inputs being fetched; while
    `merging`, the output written (its totals are planned at submission); while `publishing`, the bytes sent to
    the publish target."""

    phase: Phase = "queued"
    tensors_done: int = 0
    tensors_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0

    def restarted(self) -> Progress:
        """A new run starts from nothing done, but the planned totals still hold."""
        return Progress(tensors_total=self.tensors_total, bytes_total=self.bytes_total)


class Timings(_Strict):
    """Seconds per phase; a phase not reached yet is absent."""

    queued: float | None = Field(None, description="Submission until the run that finished started.")
    download: float | None = Field(None, description="Fetching remote inputs into the worker's cache.")
    resolve: float | None = Field(None, description="Claim until the merge starts: starting the job process, "
                                  "loading the engine, resolving references and planning.")
    merge: float | None = Field(None, description="Reading, merging and writing tensors.")
    write: float | None = Field(None, description="Side files, manifest, fsync and moving the result into place.")
    publish: float | None = Field(None, description="Writing the result to the request's publish target.")
    total: float | None = Field(None, description="Submission until the job finished.")


class Metrics(_Strict):
    """What the run that succeeded measured."""

    peak_rss_bytes: int | None = Field(None, description="Peak resident memory of the job's process.")
    bytes_written: int | None = None
    bytes_per_second: float | None = Field(None, description="Output bytes over the engine's total time.")
    tensors_merged: int | None = None
    tensors_copied: int | None = None
    bytes_downloaded: int | None = Field(None, description="Bytes fetched from registries for this run.")
    cache_hits: int | None = Field(None, description="Remote inputs found complete in the download cache.")
    cache_hit: bool | None = Field(None, description="True when the result is an earlier identical job's (same "
                                   "request digest), shared rather than merged again.")

    @model_validator(mode="before")
    @classmethod
    def _drop_worker_host(cls, data: Any) -> Any:
        """Records written before the job's `worker` named the merging process carried its host here too."""
        if isinstance(data, dict) and "worker_host" in data:
            data = {key: value for key, value in data.items() if key != "worker_host"}
        return data


class Artifact(_Strict):
    path: str = Field(description="Path inside the merged model folder.")
    size: int
    sha256: str


class Published(_Strict):
    """Where the result was published (the request's `publish.to`)."""

    uri: str = Field(description="The publish target as requested.")
    version: str | None = Field(description="What identifies this publish: the MLflow version, the hub commit "
                                "sha, the S3 manifest's version id or ETag.")
    url: str | None = Field(description="Where a person or client finds it.")


WebhookState = Literal["pending", "delivered", "failed"]


class WebhookDelivery(_Strict):
    """The callback of a finished job: sent at least once, with the same id on every try."""

    id: str = Field(description="The `webhook-id` header: the same on every retry, for the receiver to dedupe.")
    state: WebhookState = Field("pending", description="`pending` until a 2xx answer (`delivered`), a refusal "
                                "(another status, a host the rules refuse) or the end of the retry time (`failed`).")
    created_at: datetime = Field(description="When the job ended and the callback became due; retries stop "
                                 "MERGE_WEBHOOK_RETRY_SECONDS later.")
    attempts: int = Field(0, description="Attempts started, the one in flight included.")
    last_status: int | None = Field(None, description="HTTP status of the last attempt (none on a network error).")
    last_error: str | None = Field(None, description="Why the last attempt did not deliver.")
    next_attempt_at: datetime | None = Field(None, description="While pending: when the next attempt is due (while "
                                             "one is in flight, when another process may take over from it).")
    delivered_at: datetime | None = None


class JobRecord(BaseModel):
    """One merge job. `attempt` fences writers: only the holder of the current attempt may change a run."""

    id: str
    tenant: str = DEFAULT_TENANT
    """Who owns the job: only callers of this tenant (and admins) see it."""
    status: JobStatus = JobStatus.queued
    request: MergeRequest
    inputs: list[PinnedInput] = Field(default_factory=list)
    """The base, then the adapters, pinned at submission: what the worker merges, whatever moved since."""
    created_at: datetime = Field(default_factory=utcnow)
    queued_at: datetime = Field(default_factory=utcnow)
    """When the job's message was last published: the reaper publishes it again once it has waited
    `MERGE_REQUEUE_GRACE_SECONDS` (a lost message cannot strand it)."""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempt: int = 0
    recoveries: int = 0
    worker: str | None = None
    """host:pid of the process that runs (or last ran) the job: it claimed it, holds its lease and merges (a
    Celery pool process, the embedded worker's per-job process)."""
    lease_expires_at: float | None = None
    """Store-clock epoch seconds; a running job past it has lost its worker."""
    cancel_requested: bool = False
    progress: Progress = Field(default_factory=Progress)
    timings: Timings = Field(default_factory=Timings)
    metrics: Metrics = Field(default_factory=Metrics)
    error: dict[str, Any] | None = None
    """The problem document (RFC 9457) of a failed run."""
    artifacts: list[Artifact] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    request_digest: str | None = None
    """sha256 of the pinned inputs, weights, order, output options and engine version (`core.digest`)."""
    reused_from: str | None = None
    """The earlier job whose result this one shares (same request digest), instead of merging again."""
    published: Published | None = None
    webhook: WebhookDelivery | None = None

    @property
    def artifact_bytes(self) -> int:
        return sum(artifact.size for artifact in self.artifacts)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> JobRecord:
        return cls.model_validate_json(text)
