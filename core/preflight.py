"""From a merge request to engine inputs: resolve references, check their kind, plan the merge.

The API runs this before queueing (so a bad reference is a 4xx now, not a failed job later) and the worker
runs it again before merging (the folders may have changed meanwhile). Planning reads headers and configs
(and, for a tied output embedding, compares the two embeddings' bytes); it never imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from adapter_merge.core.problems import Problem, engine_problem_type
from adapter_merge.core.refs import Resolver, check_kind
from adapter_merge.core.request import MergeRequest
from adapter_merge.worker.engine import AdapterSpec, MergeError, MergeOptions, MergePlan, plan_merge

OPTION_FIELDS = {"dtype": "output_dtype", "max_shard_size": "max_shard_size"}
"""Engine option -> the request field that sets it."""


@dataclass(frozen=True)
class ResolvedMerge:
    base: Path
    adapters: list[AdapterSpec]
    options: MergeOptions
    names: dict[Path, str]
    """Resolved folder -> the reference as the client wrote it, so that messages never show server paths."""


def resolve_request(request: MergeRequest, resolver: Resolver) -> ResolvedMerge:
    base = resolver.resolve(request.base_model, "base_model")
    check_kind(base, request.base_model, "base_model", adapter=False)
    names = {base: request.base_model}
    adapters = []
    for index, adapter in enumerate(request.adapters):
        field = adapter_field(index)
        path = resolver.resolve(adapter.ref, field)
        check_kind(path, adapter.ref, field, adapter=True)
        names.setdefault(path, adapter.ref)
        adapters.append(AdapterSpec(path, adapter.weight))
    options = MergeOptions(dtype=request.output_dtype, max_shard_size=request.max_shard_size)
    return ResolvedMerge(base, adapters, options, names)


def adapter_field(index: int) -> str:
    return f"adapters[{index}].ref"


def error_field(error: MergeError) -> str | None:
    """The request field an engine error is about, from the facts it carries."""
    if error.input == "base":
        return "base_model"
    if isinstance(error.input, int):
        return adapter_field(error.input)
    return OPTION_FIELDS.get(error.option or "")


def merge_problem(error: MergeError, names: Mapping[Path, str]) -> Problem:
    """An engine error as a problem naming the request field (and file and tensor) at fault, with input
    folders named by their references as the client wrote them; a failure of the server's own storage says
    what failed, not where."""
    if error.fault == "machine":
        cause = error.__cause__
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else type(error).__name__
        return Problem(engine_problem_type(error), f"the server could not write the merged model: {reason}")
    message = str(error)
    for path in sorted(names, key=lambda path: -len(str(path))):
        message = message.replace(str(path), names[path])
    field = error_field(error)
    return Problem(engine_problem_type(error), f"{field}: {message}" if field else message, field=field,
                   tensor=error.tensor)


def preflight(request: MergeRequest, resolver: Resolver) -> tuple[ResolvedMerge, MergePlan]:
    """Everything that can be checked without merging; raises `Problem` (422) on the first fault."""
    resolved = resolve_request(request, resolver)
    try:
        plan = plan_merge(resolved.base, resolved.adapters, resolved.options)
    except MergeError as error:
        raise merge_problem(error, resolved.names) from error
    return resolved, plan
