"""The wire format of the API: request and response models, separate from the stored `JobRecord`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, field_validator

from adapter_merge.core.store import JobRecord, JobStatus
from adapter_merge.worker.engine.spec import parse_size

Ref = Annotated[str, StringConstraints(min_length=1, max_length=4096)]
OutputDtype = Literal["auto", "bfloat16", "float16", "float32"]


def _shard_size(value: object) -> int | None:
    """Bytes (a positive integer) or a size string such as '5GB'; booleans and fractions are refused."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = parse_size(value)
        except Exception as exc:  # the engine's message names the option; pydantic wants a ValueError
            raise ValueError(str(exc).removeprefix("max_shard_size: ")) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be a number of bytes or a size like '5GB', got {value!r}")
    if value <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return value


class AdapterIn(BaseModel):
    """One adapter and the multiplier applied to its scaling (PEFT's `set_scale`)."""

    model_config = ConfigDict(extra="forbid")

    ref: Ref = Field(description="Adapter folder inside a model root: absolute, or relative to the first root.")
    weight: float = Field(1.0, strict=True, allow_inf_nan=False, description="Scale multiplier, default 1.0.")


class MergeRequest(BaseModel):
    """A merge to run: one base model and one or more adapters applied in order."""

    model_config = ConfigDict(extra="forbid")

    base_model: Ref = Field(description="Base model folder inside a model root (config.json + safetensors).")
    adapters: list[AdapterIn] = Field(
        min_length=1, max_length=64,
        description="Adapters in order; each is {ref, weight} or a bare ref string.",
        json_schema_extra={"items": {"anyOf": [{"$ref": "#/components/schemas/AdapterIn"}, {"type": "string"}]}},
    )
    output_dtype: OutputDtype = Field("auto", description="dtype of the merged weights; auto keeps the base's.")
    max_shard_size: Annotated[int | None, BeforeValidator(_shard_size)] = Field(
        None, description="Re-shard the output: bytes or a size like '5GB'; null keeps the base layout.",
        json_schema_extra={"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string"}, {"type": "null"}]},
    )

    @field_validator("adapters", mode="before")
    @classmethod
    def _bare_refs(cls, value: object) -> object:
        if isinstance(value, list):
            return [{"ref": item} if isinstance(item, str) else item for item in value]
        return value


class ProgressOut(BaseModel):
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int


class TimingsOut(BaseModel):
    """Seconds per phase; a phase not reached yet is absent."""

    queued: float | None = Field(None, description="Submission until the run that finished started.")
    resolve: float | None = Field(None, description="Claim until the merge starts: loading the engine, resolving "
                                  "references and planning.")
    merge: float | None = Field(None, description="Reading, merging and writing tensors.")
    write: float | None = Field(None, description="Finishing the files and publishing the result.")
    total: float | None = Field(None, description="Submission until the job finished.")


class MetricsOut(BaseModel):
    peak_rss_bytes: int | None = None
    bytes_written: int | None = None
    bytes_per_second: float | None = Field(None, description="Output bytes over merge seconds.")
    tensors_merged: int | None = None
    tensors_copied: int | None = None
    worker_host: str | None = None
    worker: str | None = Field(None, description="host:pid of the process that ran the job.")


class ArtifactOut(BaseModel):
    path: str
    size: int
    sha256: str
    url: str = Field(description="Download URL (supports Range; ETag is the sha256).")


class JobOut(BaseModel):
    id: str
    status: JobStatus
    request: MergeRequest
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int = Field(description="Runs started; more than 1 after a worker was lost.")
    worker: str | None = Field(description="host:pid of the worker running (or that last ran) the job.")
    cancel_requested: bool
    progress: ProgressOut
    timings: TimingsOut
    metrics: MetricsOut
    error: dict[str, Any] | None = Field(description="Problem details (RFC 9457) when the job failed.")
    artifacts: list[ArtifactOut]
    archive_url: str | None = Field(description="The whole merged model as one tar, once succeeded.")
    notes: list[str]


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
        id=job.id, status=job.status, request=MergeRequest.model_validate(job.request),
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        attempts=job.attempt, worker=job.worker, cancel_requested=job.cancel_requested,
        progress=ProgressOut(**job.progress.model_dump()), timings=TimingsOut(**job.timings),
        metrics=MetricsOut(**job.metrics), error=job.error,
        artifacts=[ArtifactOut(**artifact.model_dump(), url=f"{base}/artifacts/{quote(artifact.path)}")
                   for artifact in job.artifacts] if succeeded else [],
        archive_url=f"{base}/archive" if succeeded else None,
        notes=job.notes,
    )
