"""The API's response models: the core's job models as clients see them (download URLs added, bookkeeping
such as leases left out). The request body is the core's `MergeRequest`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field

from adapter_merge.core.jobs import (
    Artifact,
    JobRecord,
    JobStatus,
    Metrics,
    Progress,
    Published,
    Timings,
    WebhookDelivery,
)
from adapter_merge.core.request import MergeRequest
from adapter_merge.core.sources.base import PinnedInput


class ArtifactOut(Artifact):
    url: str = Field(description="Download URL (supports Range; ETag is the sha256).")


class JobOut(BaseModel):
    id: str
    tenant: str = Field(description="The tenant that owns the job.")
    status: JobStatus
    request: MergeRequest
    inputs: list[PinnedInput] = Field(description="The base, then the adapters, pinned at submission.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int = Field(description="Runs started; more than 1 after a worker was lost.")
    worker: str | None = Field(description="host:pid of the worker that claimed (or last claimed) the job.")
    cancel_requested: bool
    progress: Progress
    timings: Timings
    metrics: Metrics
    error: dict[str, Any] | None = Field(description="Problem details (RFC 9457) when the job failed.")
    artifacts: list[ArtifactOut]
    archive_url: str | None = Field(description="The whole merged model as one tar, once succeeded.")
    notes: list[str]
    request_digest: str | None = Field(description="sha256 of what the merge depends on: identical requests "
                                       "share one result.")
    reused_from: str | None = Field(description="The earlier identical job whose result this one shares.")
    published: Published | None = Field(description="Where the result was published, once it is.")
    webhook: WebhookDelivery | None = Field(description="Delivery of the callback to `callback_url`.")


class JobPage(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    mode: Literal["embedded", "distributed"]
    checks: dict[str, str] = Field(description="Each check: 'ok' or what is wrong.")


class ProblemOut(BaseModel):
    """RFC 9457 problem details; extra members (field, ref, errors, checks) say what is at fault."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem documents a route can answer with."""
    return {status: {"model": ProblemOut, "content": {"application/problem+json": {}}} for status in statuses}


def job_view(job: JobRecord) -> JobOut:
    """The public view of a stored job, with download URLs."""
    base = f"/jobs/{job.id}"
    succeeded = job.status is JobStatus.succeeded
    return JobOut(
        id=job.id, tenant=job.tenant, status=job.status, request=job.request, inputs=job.inputs,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        attempts=job.attempt, worker=job.worker, cancel_requested=job.cancel_requested,
        progress=job.progress, timings=job.timings, metrics=job.metrics, error=job.error,
        artifacts=[ArtifactOut(**artifact.model_dump(), url=f"{base}/artifacts/{quote(artifact.path)}")
                   for artifact in job.artifacts] if succeeded else [],
        archive_url=f"{base}/archive" if succeeded else None,
        notes=job.notes, request_digest=job.request_digest, reused_from=job.reused_from,
        published=job.published, webhook=job.webhook,
    )
