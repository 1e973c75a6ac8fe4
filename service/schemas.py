"""The API's response models: the core's job models as clients see them (download URLs added, bookkeeping
such as leases left out). The request body is the core's `MergeRequest`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer
from pydantic.json_schema import SkipJsonSchema

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
from adapter_merge.service.problems import PROBLEM_MEDIA_TYPE

SCHEMAS = "#/components/schemas/"
ServiceMode = Literal["embedded", "distributed"]


class FieldError(BaseModel):
    """One invalid part of a request (a 422 validation-error lists one per field)."""

    field: str = Field(description="The body field (`adapters[1].ref`), or `query parameter 'limit'` and the like.")
    message: str
    type: str = Field(description="The validator's error kind, e.g. `missing`, `extra_forbidden`, `int_parsing`.")


def _member(description: str) -> Any:
    """A problem member: present only where it applies, never null (the schema says so, for typed clients)."""
    return Field(None, description=description, json_schema_extra=lambda schema: schema.pop("default", None))


class ProblemDetails(BaseModel):
    """RFC 9457 problem details, the body of every error (`application/problem+json`) and a failed job's
    `error`. The typed members say what is at fault; new ones may appear (additional properties)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="`urn:adapter-merge:problem:<slug>`: what kind of problem; match on this.")
    title: str
    status: int
    detail: str = Field(description="One line for people; starts with the field at fault where there is one.")
    instance: str | SkipJsonSchema[None] = _member("The request path that failed.")
    field: str | SkipJsonSchema[None] = _member("The request field, parameter or header at fault "
                                                "(`adapters[1].ref`, `job_id`, `Range`, `Content-Type`).")
    ref: str | SkipJsonSchema[None] = _member("The reference at fault, as the client wrote it.")
    file: str | SkipJsonSchema[None] = _member("The file at fault, inside the referenced model or adapter.")
    tensor: str | SkipJsonSchema[None] = _member("The tensor at fault.")
    errors: list[FieldError] | SkipJsonSchema[None] = _member("validation-error: every invalid field.")
    limit: int | SkipJsonSchema[None] = _member("The limit exceeded (request bytes, active jobs, artifact bytes).")
    status_now: JobStatus | SkipJsonSchema[None] = _member("The job's status that refused the operation.")
    role: str | SkipJsonSchema[None] = _member("forbidden: the caller's role.")
    checks: dict[str, str] | SkipJsonSchema[None] = _member("not-ready: each readiness check, 'ok' or what is "
                                                            "wrong.")
    mode: ServiceMode | SkipJsonSchema[None] = _member("not-ready: the service's mode.")
    free_bytes: int | SkipJsonSchema[None] = _member("storage-full: bytes free in the data dir.")
    min_free_bytes: int | SkipJsonSchema[None] = _member("storage-full: bytes the data dir must keep free.")

    @model_serializer(mode="wrap")
    def _present_members_only(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        """As the API sends problems: members that do not apply are left out, not sent as null. (No return
        annotation: pydantic would take it as the serialized schema, and the schema is the fields'.)"""
        return {name: value for name, value in handler(self).items() if value is not None}


def header(description: str, kind: str = "string") -> dict[str, Any]:
    """An OpenAPI response header entry."""
    return {"description": description, "schema": {"type": kind}}


_PROBLEM_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": header("`Bearer`, with the error for a token that was refused.")},
    416: {"Content-Range": header("`bytes */<size>`: the size of the file.")},
    429: {"Retry-After": header("Seconds after which a slot may be free.", "integer")},
    503: {"Retry-After": header("Seconds after which trying again may work.", "integer")},
}
JOB_LOCATION = {"headers": {"Location": header("`/jobs/{id}`: where to follow the job.")}}
"""The 202 of a submitted merge."""


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem documents a route can answer with, with the headers they carry. The
    schema is referenced, not given as `model` (FastAPI would file that under application/json); JobOut's
    `error` puts the component into every document."""
    return {status: {"content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": f"{SCHEMAS}{ProblemDetails.__name__}"}}},
                     **({"headers": _PROBLEM_HEADERS[status]} if status in _PROBLEM_HEADERS else {})}
            for status in statuses}


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
    worker: str | None = Field(description="host:pid of the process that runs (or last ran) the job: it claimed "
                               "the job, holds its lease and merges (a Celery pool process, or the embedded worker's "
                               "per-job process).")
    cancel_requested: bool
    progress: Progress
    timings: Timings
    metrics: Metrics
    error: ProblemDetails | None = Field(description="Problem details (RFC 9457) when the job failed.")
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
    mode: ServiceMode
    checks: dict[str, str] = Field(description="Each check: 'ok' or what is wrong.")


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
