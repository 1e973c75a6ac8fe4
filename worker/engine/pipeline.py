"""Run a merge plan: stream every output tensor into its shard, then the side files and the manifest.

Verbatim tensors are copied by the kernel; changed tensors are computed a row block at a time and written
as soon as each block is ready. Inputs are checksummed on another thread meanwhile. On any failure or
cancellation the temporary output folder is removed, so the target either appears complete or not at all.
"""

from __future__ import annotations

import resource
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from worker.engine.errors import MergeCancelled
from worker.engine.manifest import build_manifest, describe_files, hash_inputs_in_background
from worker.engine.plan import MergePlan, plan_merge
from worker.engine.side_files import MANIFEST_FILE, write_json, write_side_files
from worker.engine.spec import AdapterSpec, MergeOptions, MergeReport, Progress, ProgressCallback, StopCheck
from worker.engine.tensor_io import TensorReader, tensor_bytes
from worker.engine.tensor_merge import ChangeStats, TensorMerger
from worker.engine.writer import OutputFolder, ShardWriter


def merge(
    base_dir: Path | str,
    adapters: list[AdapterSpec],
    out_dir: Path | str,
    options: MergeOptions | None = None,
    *,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> MergeReport:
    """Merge `adapters` (in order) into the base model and write the result to `out_dir`."""
    options = options or MergeOptions()
    started = time.perf_counter()
    plan = plan_merge(base_dir, adapters, options)
    timings = {"plan": time.perf_counter() - started}
    folder = OutputFolder(Path(out_dir), options.overwrite)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-hash") as pool:
            inputs = hash_inputs_in_background(plan, pool)
            phase = time.perf_counter()
            changes = _write_shards(plan, folder.path, progress, should_stop)
            timings["merge"] = time.perf_counter() - phase
            phase = time.perf_counter()
            notes = [*plan.notes, *write_side_files(plan, folder.path)]
            outputs = describe_files(folder.path, sorted(p for p in folder.path.iterdir() if p.is_file()))
            timings["finalize"] = time.perf_counter() - phase
            timings["total"] = time.perf_counter() - started
            manifest = build_manifest(plan, inputs.result(), outputs, changes, timings, notes)
        write_json(folder.path / MANIFEST_FILE, manifest)
        folder.commit()
    except BaseException:
        folder.abort()
        raise
    timings["total"] = time.perf_counter() - started
    outputs = [*outputs, *describe_files(folder.target, [folder.target / MANIFEST_FILE])]
    return MergeReport(
        output_dir=folder.target,
        tensors_total=len(plan.outputs),
        tensors_merged=len(changes),
        tensors_copied=len(plan.outputs) - len(changes),
        bytes_written=sum(int(entry["size"]) for entry in outputs),
        files=outputs,
        timings=timings,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        notes=notes,
    )


def _write_shards(
    plan: MergePlan, folder: Path, progress: ProgressCallback | None, should_stop: StopCheck | None
) -> dict[str, float]:
    """Write every shard; returns the relative change of each changed tensor, for the manifest."""
    labels = {adapter.index: adapter.label for adapter in plan.adapters}
    tensors_total, bytes_total = len(plan.outputs), plan.bytes_total
    done = bytes_done = 0
    changes: dict[str, Any] = {}
    with TensorReader() as reader:
        merger = TensorMerger(reader, labels)
        for shard_name, tensors in plan.shards.items():
            writer = ShardWriter(folder / shard_name, tensors)
            for tensor in tensors:
                if should_stop is not None and should_stop():
                    raise MergeCancelled("merge cancelled")
                if tensor.verbatim:
                    writer.copy_tensor(tensor.name, reader, tensor)
                else:
                    stats = ChangeStats()
                    for block in merger.blocks(tensor, stats):
                        writer.write_block(tensor.name, tensor_bytes(block))
                    if tensor.changed:
                        changes[tensor.name] = stats.relative_change
                done, bytes_done = done + 1, bytes_done + tensor.nbytes
                if progress is not None:
                    progress(Progress(done, tensors_total, bytes_done, bytes_total))
            writer.close()
    return changes
