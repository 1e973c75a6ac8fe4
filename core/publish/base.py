"""What every publish target implements, and the lineage that travels with a published model.

A target is looked up by the scheme of `publish.to` (`models:/`, `s3://`, `hf://`). Publishing is a step of
the job, run by the worker after the merged folder is in place; a worker may die in the middle of it and the
rerun publishes again, so every target first looks for an earlier publish of the same request digest and
returns that instead of creating a second version, commit or manifest.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from adapter_merge.core.jobs import Artifact, JobRecord, Published
from adapter_merge.core.request import PublishSpec
from adapter_merge.core.sources.base import PinnedInput
from adapter_merge.worker.engine.folder_survey import MANIFEST_FILE
from adapter_merge.worker.engine.manifest import engine_version


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

    def tags(self) -> dict[str, str]:
        """The lineage as flat string tags or metadata (MLflow run and version tags): the identities as they are,
        the pins and the options as compact JSON; every file's sha256 stays in `LINEAGE_FILE`, the manifest's own
        sha256 here (the manifest lists the others)."""
        tags = {"job_id": self.job_id, "request_digest": self.request_digest, "engine_version": self.engine_version,
                "base": self.base.ref, "base_pinned": _compact(self.base.pinned), "options": _compact(self.options),
                "manifest_sha256": self.manifest_sha256.get(MANIFEST_FILE, "")}
        for index, adapter in enumerate(self.adapters):
            tags |= {f"adapter_{index}": adapter.ref, f"adapter_{index}_pinned": _compact(adapter.pinned),
                     f"adapter_{index}_weight": repr(adapter.weight)}
        return tags


LINEAGE_FILE = "merge_lineage.json"
"""The whole `Lineage` as JSON, published beside the model's files (before the manifest) where tags cannot hold it."""
TO_FIELD = "publish.to"
ALIAS_FIELD = "publish.alias"
"""The request fields problems of publishing name."""

ByteCounter = Callable[[int], None]
"""Told how many more bytes went out, as they go (progress). It may raise (the job was cancelled): the target then
stops, lets the exception through, and leaves nothing a reader would take for a complete model."""


class PublishTarget(Protocol):
    scheme: str

    def check(self, spec: PublishSpec, field: str) -> None:
        """At submission: raise a 422 `Problem` naming `field` for a target this scheme cannot publish to
        (malformed URI, an option that does not apply); no network call."""
        ...

    def find(self, spec: PublishSpec, lineage: Lineage) -> Published | None:
        """An earlier complete publish of `lineage.request_digest` to this target, if there is one; a `Problem`
        (409 publish-conflict) where publishing would overwrite another request's model."""
        ...

    def publish(self, spec: PublishSpec, folder: Path, lineage: Lineage, progress: ByteCounter) -> Published:
        """Publish `folder` (the merged model, manifest included) with its lineage; raise a `Problem` (503 for a
        registry out of reach, 502 for one that refused) on failure, leaving nothing a reader would take for
        a complete model."""
        ...


def lineage_of(job: JobRecord, inputs: list[PinnedInput], artifacts: list[Artifact]) -> Lineage:
    """The lineage of `job`'s merged folder (`artifacts`), its `inputs` as pinned. A job without a request digest
    (submitted before digests existed) is identified by its id instead: a rerun of it still finds its own publish,
    another job with the same inputs does not."""
    base, *adapters = inputs
    return Lineage(
        job_id=job.id, request_digest=job.request_digest or job.id, engine_version=engine_version(),
        base=lineage_input(base),
        adapters=[lineage_input(pinned, given.weight) for pinned, given in zip(adapters, job.request.adapters,
                                                                               strict=True)],
        options={"output_dtype": job.request.output_dtype, "max_shard_size": job.request.max_shard_size},
        manifest_sha256={artifact.path: artifact.sha256 for artifact in artifacts},
    )


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def lineage_input(pinned: PinnedInput, weight: float | None = None) -> LineageInput:
    """An input's lineage from its pin: per file the sha256 where known, else the S3 key and ETag."""
    files = {}
    for file in pinned.files:
        if file.sha256:
            files[file.path] = f"sha256:{file.sha256}"
        elif file.etag:
            files[file.path] = f"{file.location or file.path}@{file.etag}"
    return LineageInput(ref=pinned.ref, pinned=dict(pinned.version), files=files, weight=weight)
