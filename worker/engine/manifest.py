"""The merge manifest: what went in (with checksums), what options were used, what came out."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from adapter_merge.worker.engine.checksums import ChecksumCache
from adapter_merge.worker.engine.errors import InputRef
from adapter_merge.worker.engine.input_files import unreadable
from adapter_merge.worker.engine.plan import MergePlan


def engine_version() -> str:
    try:
        return metadata.version("adapter-merge")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def input_files(plan: MergePlan) -> dict[str, tuple[Path, list[Path], InputRef]]:
    """Every file the merge reads, grouped by where it came from, with the folder paths are relative to and
    the input they belong to."""
    groups: dict[str, tuple[Path, list[Path], InputRef]] = {"base": (plan.base.root, list(plan.base.files), "base")}
    for adapter in plan.adapters:
        groups[f"adapter {adapter.index}"] = (adapter.root, [adapter.config.path, adapter.weights_file],
                                              adapter.index)
    return groups


def hash_inputs_in_background(
    plan: MergePlan, cache: ChecksumCache, pool: ThreadPoolExecutor
) -> Future[dict[str, list[dict[str, Any]]]]:
    """Checksum the inputs on another thread while the merge runs (hashlib releases the GIL)."""
    groups = input_files(plan)

    def describe(root: Path, path: Path, input: InputRef) -> dict[str, Any]:
        with plan.files.open(path, input) as handle:
            try:
                return {"path": str(path.relative_to(root)), "size": os.fstat(handle.fileno()).st_size,
                        "sha256": cache.sha256(path, handle)}
            except OSError as error:
                raise unreadable(path, input, error) from error

    return pool.submit(lambda: {key: [describe(root, path, input) for path in paths]
                                for key, (root, paths, input) in groups.items()})


def build_manifest(
    plan: MergePlan,
    inputs: dict[str, list[dict[str, Any]]],
    outputs: list[dict[str, Any]],
    side_outputs: list[dict[str, Any]],
    tensor_changes: dict[str, float],
    timings: dict[str, float],
    notes: list[str],
) -> dict[str, Any]:
    """The manifest; `side_outputs` are the output files besides the shards, of which the copies are listed
    again under "copied" with the input they came from, beside what of the base was "skipped" and why."""
    origins = {name: "base" if input == "base" else f"adapter {input}" for name, (_, input) in plan.side_files.items()}
    return {
        "engine": {"name": "adapter-merge", "version": engine_version()},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "base": {"path": plan.files.shown(plan.base.root), "files": inputs["base"]},
        "adapters": [
            {
                "path": adapter.shown,
                "weight": adapter.weight,
                "config": adapter.config.raw,
                "files": inputs[f"adapter {adapter.index}"],
            }
            for adapter in plan.adapters
        ],
        "options": {"dtype": plan.options.dtype, "max_shard_size": plan.options.max_shard_size},
        "tensors": {
            "total": len(plan.outputs),
            "changed": len(tensor_changes),
            "relative_change": tensor_changes,
        },
        "outputs": outputs,
        "copied": [{**entry, "from": origins[entry["path"]]} for entry in side_outputs if entry["path"] in origins],
        "skipped": [{"path": skipped.path, "reason": skipped.reason} for skipped in plan.base.survey.skipped],
        "timings": timings,
        "notes": notes,
    }
