"""What every publish target implements, and the lineage that travels with a published model.

A target is looked up by the scheme of `publish.to` (`models:/`, `s3://`, `hf://`). Publishing is a step of
the job, run by the worker after the merged folder is in place; a worker may die in the middle of it and the
rerun publishes again, so every target first looks for an earlier publish of the same request digest and
returns that instead of creating a second version, commit or manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from adapter_merge.core.jobs import Published
from adapter_merge.core.request import PublishSpec
from adapter_merge.core.sources.base import PinnedInput


class LineageInput(BaseModel):
    """One input as the client gave it and as it was pinned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ref: str
    pinned: dict[str, str] = Field(description="The pin: commit sha, model version and run id, ...")
    files: dict[str, str] = Field(default_factory=dict, description="Path -> the registry's identity of the file "
                                  "(sha256, or S3 key and ETag), where the source lists files.")
    weight: float | None = Field(None, description="Adapters: the scale multiplier.")


class Lineage(BaseModel):
    """Everything a published model is traced back to; written as tags, metadata and a model card."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    request_digest: str
    engine_version: str
    base: LineageInput
    adapters: list[LineageInput]
    options: dict[str, str | int | None] = Field(description="output_dtype, max_shard_size.")
    manifest_sha256: dict[str, str] = Field(description="Path -> sha256 of every file of the merged folder.")


ByteCounter = Callable[[int], None]
"""Told how many more bytes went out, as they go (progress)."""


class PublishTarget(Protocol):
    scheme: str

    def check(self, spec: PublishSpec, field: str) -> None:
        """At submission: raise a 422 `Problem` naming `field` for a target this scheme cannot publish to
        (malformed URI, an option that does not apply); no network call."""
        ...

    def find(self, spec: PublishSpec, lineage: Lineage) -> Published | None:
        """An earlier complete publish of `lineage.request_digest` to this target, if there is one."""
        ...

    def publish(self, spec: PublishSpec, folder: Path, lineage: Lineage, progress: ByteCounter) -> Published:
        """Publish `folder` (the merged model, manifest included) with its lineage; raise a `Problem` (503 for a
        registry out of reach, 502 for one that refused) on failure, leaving nothing a reader would take for
        a complete model."""
        ...


def lineage_input(pinned: PinnedInput, weight: float | None = None) -> LineageInput:
    """An input's lineage from its pin: per file the sha256 where known, else the S3 key and ETag."""
    files = {}
    for file in pinned.files:
        if file.sha256:
            files[file.path] = f"sha256:{file.sha256}"
        elif file.etag:
            files[file.path] = f"{file.location or file.path}@{file.etag}"
    return LineageInput(ref=pinned.ref, pinned=dict(pinned.version), files=files, weight=weight)
