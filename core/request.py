"""What a client asks for: one base model and adapters applied in order, with output options.

The API validates a body into a `MergeRequest`; the job record stores it as validated, and the worker reads
it back from there. Field names are the ones problems point at (`base_model`, `adapters[1].ref`, ...).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, field_validator

from adapter_merge.worker.engine import InputError, parse_size
from adapter_merge.worker.engine.spec import OutputDtype

SIZE_PATTERN = r"^\s*([0-9]*[1-9][0-9]*(\.[0-9]+)?|0+\.[0-9]*[1-9][0-9]*)\s*([KMGTkmgt][Ii]?[Bb]|[Bb])?\s*$"
"""The size strings `parse_size` reads (a non-zero number, an optional unit), for the schema."""
MAX_REF_LENGTH = 4096
Ref = Annotated[str, StringConstraints(min_length=1, max_length=MAX_REF_LENGTH)]
REFERENCE_FORMS = (
    "a folder inside a model root (absolute, relative to the first root, or file:///absolute/path); "
    "hf://ORG/NAME[@REVISION][/SUBFOLDER] (a Hugging Face hub repo; REVISION a branch, tag, commit or refs/pr/N, "
    "default main); s3://BUCKET/PREFIX (the objects under the prefix); models:/NAME/VERSION or models:/NAME@ALIAS "
    "(an MLflow registry version). Remote ones only where MERGE_ALLOWED_SOURCES allows them; every reference is "
    "pinned to an immutable version when the job is submitted."
)


def _shard_size(value: object) -> int | None:
    """Bytes (a positive integer) or a size string such as '5GB'; booleans and fractions are refused."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = parse_size(value)
        except InputError:
            raise ValueError(f"{value!r} is not a size like 5GB, 500MB or 2GiB") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be a number of bytes or a size like '5GB', got {value!r}")
    if value <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return value


class AdapterIn(BaseModel):
    """One adapter and the multiplier applied to its scaling (PEFT's `set_scale`)."""

    model_config = ConfigDict(extra="forbid")

    ref: Ref = Field(description="The adapter: " + REFERENCE_FORMS)
    weight: float = Field(1.0, strict=True, allow_inf_nan=False, description="Scale multiplier, default 1.0.")


PUBLISH_FORMS = (
    "models:/NAME (a new version of an MLflow registered model, created if missing); s3://BUCKET/PREFIX (the "
    "merged folder under PREFIX/, its manifest written last); hf://ORG/NAME[@BRANCH] (one commit on a Hugging Face "
    "hub repo, default branch main). Only where MERGE_ALLOWED_SOURCES (and the tenant's patterns) allow it."
)


class PublishSpec(BaseModel):
    """Where the merged model goes once it is merged, besides the service's own artifacts."""

    model_config = ConfigDict(extra="forbid")

    to: Ref = Field(description="The publish target: " + PUBLISH_FORMS)
    alias: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,255}$")] | None = Field(
        None, description="models:/ only: the MLflow alias moved to the new version once it is READY.")


class MergeRequest(BaseModel):
    """A merge to run: one base model and one or more adapters applied in order."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"base_model": "llama-3-8b", "adapters": ["my-lora", {"ref": "other-lora", "weight": 0.5}],
         "output_dtype": "auto", "max_shard_size": "5GB"},
    ]})

    base_model: Ref = Field(description="The base model (config.json + safetensors): " + REFERENCE_FORMS)
    adapters: list[AdapterIn] = Field(
        min_length=1, max_length=64,
        description="Adapters in order; each is {ref, weight} or a bare ref string.",
        json_schema_extra={"items": {"anyOf": [{"$ref": "#/components/schemas/AdapterIn"},
                                               {"type": "string", "minLength": 1, "maxLength": MAX_REF_LENGTH}]}},
    )
    output_dtype: OutputDtype = Field("auto", description="dtype of the merged weights; auto keeps the base's.")
    max_shard_size: Annotated[int | None, BeforeValidator(_shard_size)] = Field(
        None, description="Re-shard the output: bytes or a size like '5GB'; null keeps the base layout.",
        json_schema_extra={"anyOf": [{"type": "integer", "minimum": 1},
                                     {"type": "string", "pattern": SIZE_PATTERN}, {"type": "null"}]},
    )

    publish: PublishSpec | None = Field(None, description="Also publish the result to a registry.")
    callback_url: Annotated[str, StringConstraints(min_length=1, max_length=2048)] | None = Field(
        None, description="An http(s) URL that gets a signed POST (Standard Webhooks) when the job ends; its host "
        "must be allowed by MERGE_WEBHOOK_ALLOWED_HOSTS.")
    reuse: bool = Field(True, strict=True, description="Answer from an earlier identical merge (same request "
                        "digest) when its result is still kept, or attach to one still running; false forces a "
                        "fresh merge.")

    @field_validator("adapters", mode="before")
    @classmethod
    def _bare_refs(cls, value: object) -> object:
        if isinstance(value, list):
            return [{"ref": item} if isinstance(item, str) else item for item in value]
        return value
