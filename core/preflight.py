"""From a merge request to engine inputs: resolve references, check their kind, plan the merge.

The API runs this before queueing (so a bad reference is a 4xx now, not a failed job later) and the worker
runs it again before merging (the folders may have changed meanwhile). Planning reads headers only and
never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapter_merge.core.refs import Resolver, check_kind
from adapter_merge.service.problems import Problem
from adapter_merge.service.schemas import MergeRequest
from adapter_merge.worker.engine import (
    AdapterSpec,
    InputError,
    MergeOptions,
    MergePlan,
    UnsupportedOptionError,
    plan_merge,
)


@dataclass(frozen=True)
class ResolvedMerge:
    base: Path
    adapters: list[AdapterSpec]
    options: MergeOptions
    fields: dict[Path, str]
    """Resolved folder -> the request field that named it, to point engine errors at the right field."""


def resolve_request(request: MergeRequest, resolver: Resolver) -> ResolvedMerge:
    base = resolver.resolve(request.base_model, "base_model")
    check_kind(base, request.base_model, "base_model", adapter=False)
    fields = {base: "base_model"}
    adapters = []
    for index, adapter in enumerate(request.adapters):
        field = f"adapters[{index}].ref"
        path = resolver.resolve(adapter.ref, field)
        check_kind(path, adapter.ref, field, adapter=True)
        fields.setdefault(path, field)
        adapters.append(AdapterSpec(path, adapter.weight))
    size = request.max_shard_size
    options = MergeOptions(dtype=request.output_dtype, max_shard_size=int(size) if size is not None else None)
    return ResolvedMerge(base, adapters, options, fields)


def input_problem(error: InputError, resolved: ResolvedMerge) -> Problem:
    """An engine input error as a 422 naming the request field whose folder it is about."""
    message = str(error)
    field = next((name for path, name in sorted(resolved.fields.items(), key=lambda item: -len(str(item[0])))
                  if str(path) in message), None)
    if field is None and message.startswith(("dtype:", "max_shard_size:")):
        field = "output_dtype" if message.startswith("dtype:") else "max_shard_size"
    slug = "unsupported-adapter" if isinstance(error, UnsupportedOptionError) else "inputs-do-not-fit"
    detail = f"{field}: {message}" if field else message
    return Problem(422, slug, detail, title="Inputs cannot be merged", field=field)


def preflight(request: MergeRequest, resolver: Resolver) -> tuple[ResolvedMerge, MergePlan]:
    """Everything that can be checked without merging; raises `Problem` (422) on the first fault."""
    resolved = resolve_request(request, resolver)
    try:
        plan = plan_merge(resolved.base, resolved.adapters, resolved.options)
    except InputError as error:
        raise input_problem(error, resolved) from error
    return resolved, plan
