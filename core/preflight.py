"""From a merge request to engine inputs: pin references, find their files, check their kind, plan.

The API pins every reference to an immutable version and plans on it before queueing (so a bad reference is
a 4xx now, not a failed job later), reading only what planning needs of a remote input (see
`sources.replica`). The worker merges the pinned versions: local folders are checked again (they may have
changed), remote ones come from the download cache. Planning reads headers and configs (and, for a tied
output embedding, compares the two embeddings' bytes); it never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from adapter_merge.core.problems import Problem, engine_problem_type, storage_detail
from adapter_merge.core.publish.registry import PublishTargets
from adapter_merge.core.refs import check_kind
from adapter_merge.core.request import MergeRequest
from adapter_merge.core.sources.base import PinnedInput
from adapter_merge.core.sources.registry import LOCAL_SCHEME, Sources
from adapter_merge.core.sources.replica import build_replica
from adapter_merge.core.webhooks import check_callback_url
from adapter_merge.worker.engine import AdapterSpec, MergeError, MergeOptions, MergePlan, plan_merge

OPTION_FIELDS = {"dtype": "output_dtype", "max_shard_size": "max_shard_size"}
"""Engine option -> the request field that sets it."""


@dataclass(frozen=True)
class ResolvedMerge:
    base: Path
    adapters: list[AdapterSpec]
    options: MergeOptions
    names: dict[Path, str]
    """Local folder -> the reference as the client wrote it, so that messages never show server paths."""
    inputs: list[PinnedInput]
    """The base, then the adapters, as pinned."""


FolderOf = Callable[[PinnedInput, str], Path]
"""Where a pinned input's files are on this machine (its own folder, a replica, the download cache); the
second argument is the request field that names it, for errors."""


def pin_request(request: MergeRequest, sources: Sources, tenant: str | None) -> list[PinnedInput]:
    """Every reference of the request pinned, as `tenant` may: the base first, then the adapters in order."""
    return [sources.pin(request.base_model, "base_model", tenant),
            *(sources.pin(adapter.ref, adapter_field(index), tenant) for index, adapter in enumerate(request.adapters))]


def resolve_request(request: MergeRequest, inputs: list[PinnedInput], folder_of: FolderOf,
                    allowed_roots: tuple[Path, ...]) -> ResolvedMerge:
    """The engine's inputs: each pinned input's folder, checked to be the right kind; the engine will read no
    file whose real path lies outside `allowed_roots`."""
    base = folder_of(inputs[0], "base_model")
    check_kind(base, request.base_model, "base_model", adapter=False)
    names = {base: request.base_model}
    adapters = []
    for index, (adapter, pinned) in enumerate(zip(request.adapters, inputs[1:], strict=True)):
        field = adapter_field(index)
        path = folder_of(pinned, field)
        check_kind(path, adapter.ref, field, adapter=True)
        names.setdefault(path, adapter.ref)
        adapters.append(AdapterSpec(path, adapter.weight))
    folders = [base, *(spec.path for spec in adapters)]
    downloaded = {folder for folder, pinned in zip(folders, inputs, strict=True) if pinned.scheme != LOCAL_SCHEME}
    options = MergeOptions(dtype=request.output_dtype, max_shard_size=request.max_shard_size,
                           allowed_roots=allowed_roots,
                           input_names={path: name for path, name in names.items() if path in downloaded})
    return ResolvedMerge(base, adapters, options, names, inputs)


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
        return Problem(engine_problem_type(error), storage_detail(error))
    message = str(error)
    for path in sorted(names, key=lambda path: -len(str(path))):
        message = message.replace(str(path), names[path])
    field = error_field(error)
    return Problem(engine_problem_type(error), f"{field}: {message}" if field else message, field=field,
                   tensor=error.tensor)


def preflight(request: MergeRequest, sources: Sources, scratch: Path,
              tenant: str | None = None) -> tuple[ResolvedMerge, MergePlan]:
    """Everything that can be checked without merging; raises `Problem` (422) on the first fault. Remote
    inputs are planned on replicas written under `scratch`."""
    if request.publish is not None:  # a target it may not publish to is refused before any input is read
        PublishTargets(sources).check(request.publish, tenant)
    check_callback_url(request.callback_url, sources.settings)  # a URL it may not call back: refused up front
    replicas = iter(range(len(request.adapters) + 1))

    def folder_of(pinned: PinnedInput, field: str) -> Path:
        if pinned.local_path is not None:
            return Path(pinned.local_path)
        try:
            return build_replica(sources.remote(pinned.scheme), pinned, scratch / f"input-{next(replicas)}")
        except Problem as problem:
            raise problem.about(field) from None

    allowed = (*sources.settings.roots, scratch.resolve())
    resolved = resolve_request(request, pin_request(request, sources, tenant), folder_of, allowed)
    try:
        plan = plan_merge(resolved.base, resolved.adapters, resolved.options)
    except MergeError as error:
        raise merge_problem(error, resolved.names) from error
    return resolved, plan
