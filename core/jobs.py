"""The stored shape of a job: what the API, the runner and the reaper read and write.

Kept apart from the HTTP schemas (`adapter_merge.service.schemas`) so storage can carry bookkeeping (leases, attempts)
that clients never see, and so the API can change its wire format without a data migration.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


ACTIVE_STATUSES = frozenset({JobStatus.queued, JobStatus.running})
FINISHED_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})


def utcnow() -> datetime:
    return datetime.now(UTC)


class ProgressRecord(BaseModel):
    tensors_done: int = 0
    tensors_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0


class ArtifactRecord(BaseModel):
    path: str
    size: int
    sha256: str


class JobRecord(BaseModel):
    """One merge job. `attempt` fences writers: only the holder of the current attempt may change a run."""

    id: str
    status: JobStatus = JobStatus.queued
    request: dict[str, Any]
    created_at: datetime = Field(default_factory=utcnow)
    queued_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempt: int = 0
    recoveries: int = 0
    worker: str | None = None
    lease_expires_at: float | None = None
    """Store-clock epoch seconds; a running job past it has lost its worker."""
    cancel_requested: bool = False
    progress: ProgressRecord = Field(default_factory=ProgressRecord)
    timings: dict[str, float] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: dict[str, Any] | None = None
    artifacts: list[ArtifactRecord] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> JobRecord:
        return cls.model_validate_json(text)
