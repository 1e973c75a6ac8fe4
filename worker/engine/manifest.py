"""The merge manifest: what went in (with checksums), what options were used, what came out."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from worker.engine.plan import MergePlan

HASH_CHUNK_BYTES = 8 * 1024 * 1024


def engine_version() -> str:
    try:
        return metadata.version("adapter-merge")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def describe_files(root: Path, paths: list[Path]) -> list[dict[str, Any]]:
    """path (relative to root), size and sha256 of each file."""
    return [{"path": str(path.relative_to(root)), "size": path.stat().st_size, "sha256": sha256_file(path)}
            for path in paths]


def input_files(plan: MergePlan) -> dict[str, list[Path]]:
    """Every file the merge reads, grouped by where it came from."""
    groups = {"base": sorted(p for p in plan.base.root.iterdir() if p.is_file())}
    for adapter in plan.adapters:
        groups[f"adapter {adapter.index}"] = [adapter.config.path, adapter.weights_file]
    return groups


def hash_inputs_in_background(plan: MergePlan, pool: ThreadPoolExecutor) -> Future[dict[str, list[dict[str, Any]]]]:
    """Checksum the inputs on another thread while the merge runs (hashlib releases the GIL)."""
    groups = input_files(plan)
    roots = {"base": plan.base.root} | {f"adapter {a.index}": a.root for a in plan.adapters}
    return pool.submit(lambda: {key: describe_files(roots[key], paths) for key, paths in groups.items()})


def build_manifest(
    plan: MergePlan,
    inputs: dict[str, list[dict[str, Any]]],
    outputs: list[dict[str, Any]],
    tensor_changes: dict[str, float],
    timings: dict[str, float],
    notes: list[str],
) -> dict[str, Any]:
    return {
        "engine": {"name": "adapter-merge", "version": engine_version()},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": os.uname().nodename,
        "base": {"path": str(plan.base.root), "files": inputs["base"]},
        "adapters": [
            {
                "path": str(adapter.root),
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
        "timings": timings,
        "notes": notes,
    }
