"""Run a merge plan: stream every output tensor into its shard, then the side files and the manifest.

A reader thread reads the inputs a few chunks ahead; the calling thread computes; a hasher thread checksums
what it produced and a writer thread writes it, in order; another thread checksums the inputs. Changed
tensors are computed a cache-sized block at a time and handed over in chunks, so memory stays at a few
chunks whatever the model size. On any failure or cancellation the temporary output folder is removed:
the target appears complete or not at all.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from adapter_merge.worker.engine.block_merge import ChangeStats
from adapter_merge.worker.engine.checksums import ChecksumCache, describe_files
from adapter_merge.worker.engine.errors import MergeCancelled
from adapter_merge.worker.engine.folder_survey import MANIFEST_FILE
from adapter_merge.worker.engine.manifest import build_manifest, hash_inputs_in_background
from adapter_merge.worker.engine.operations import OutputTensor
from adapter_merge.worker.engine.plan import MergePlan, plan_merge
from adapter_merge.worker.engine.read_ahead import ReadAhead
from adapter_merge.worker.engine.side_files import write_json, write_side_files
from adapter_merge.worker.engine.spec import (
    AdapterSpec,
    MergeOptions,
    MergeReport,
    Progress,
    ProgressCallback,
    StopCheck,
)
from adapter_merge.worker.engine.tensor_io import BufferPool, ByteRange, TensorReader, chunk_ranges, tensor_bytes
from adapter_merge.worker.engine.tensor_merge import CHUNK_BYTES, TensorMerger, source_ranges
from adapter_merge.worker.engine.writer import QUEUED_CHUNKS, OutputFolder, ShardSink, storage_errors

READ_AHEAD_CHUNKS = 2
"""Chunks the reader thread may have read before the compute thread takes them."""


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
    checksums = ChecksumCache(options.checksum_cache)
    try:
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-inputs") as pool,
            torch_threads(1),
        ):
            inputs = hash_inputs_in_background(plan, checksums, pool)
            phase = time.perf_counter()
            shards, changes = _write_shards(plan, folder.path, progress, should_stop)
            timings["merge"] = time.perf_counter() - phase
            phase = time.perf_counter()
            notes = list(plan.notes)
            with storage_errors(folder.path):
                side = write_side_files(folder.path, plan.config, plan.shard_index(), plan.side_files, plan.files)
                side_outputs = describe_files(folder.path, [folder.path / name for name in side])
                outputs = sorted([*shards, *side_outputs], key=lambda entry: entry["path"])
            input_checksums = inputs.result()
            timings["finalize"] = time.perf_counter() - phase
            timings["total"] = time.perf_counter() - started
        manifest = build_manifest(plan, input_checksums, outputs, side_outputs, changes, timings, notes)
        with storage_errors(folder.path / MANIFEST_FILE):
            write_json(folder.path / MANIFEST_FILE, manifest)
        folder.commit(durable=options.fsync)
    except BaseException:
        folder.abort()
        raise
    checksums.save()
    with storage_errors(folder.target / MANIFEST_FILE):
        outputs.extend(describe_files(folder.target, [folder.target / MANIFEST_FILE]))
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


def planned_reads(shards: Iterable[list[OutputTensor]]) -> Iterator[ByteRange]:
    """Every read of the inputs' bytes the merge of `shards` makes, in the order it makes them (the read-ahead's
    schedule): verbatim tensors in chunks, changed ones by the merger's chunks of rows."""
    for tensors in shards:
        for tensor in tensors:
            if tensor.verbatim_bytes is not None:
                yield from chunk_ranges(tensor.source, CHUNK_BYTES)
            else:
                yield from source_ranges(tensor)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with `count` torch threads, restoring the caller's setting afterwards.

    Measured on 2 cores: one compute thread on cache-sized blocks, beside the writer thread, is as fast as
    any mix of more compute threads or torch's own threads, which only compete for the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _write_shards(
    plan: MergePlan, folder: Path, progress: ProgressCallback | None, should_stop: StopCheck | None
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Write every shard; returns their descriptions and the relative change of each changed tensor."""
    labels = {adapter.index: adapter.label for adapter in plan.adapters}
    tensors_total, bytes_total = len(plan.outputs), plan.bytes_total
    done = bytes_done = 0
    changes: dict[str, float] = {}
    sink = ShardSink(fsync=plan.options.fsync)
    pool = BufferPool(CHUNK_BYTES, QUEUED_CHUNKS + 2)
    read_pool = BufferPool(CHUNK_BYTES, READ_AHEAD_CHUNKS + 2)
    try:
        with (
            TensorReader(plan.files) as reader,
            ReadAhead(reader, planned_reads(plan.shards.values()), read_pool, READ_AHEAD_CHUNKS) as read_ahead,
        ):
            merger = TensorMerger(reader, labels, pool, read_ahead)
            for shard_name, tensors in plan.shards.items():
                sink.open_shard(folder / shard_name, tensors)
                for tensor in tensors:
                    if should_stop is not None and should_stop():
                        raise MergeCancelled("merge cancelled")
                    if tensor.verbatim_bytes is not None:
                        for chunk_range in chunk_ranges(tensor.source, CHUNK_BYTES):
                            raw, release = read_ahead.take(chunk_range)
                            sink.write(tensor_bytes(raw), release)
                    else:
                        stats = ChangeStats()
                        for chunk, release in merger.chunks(tensor, stats):
                            sink.write(tensor_bytes(chunk), release)
                        if tensor.changed:
                            changes[tensor.name] = stats.relative_change
                    done, bytes_done = done + 1, bytes_done + tensor.nbytes
                    if progress is not None:
                        progress(Progress(done, tensors_total, bytes_done, bytes_total))
                sink.close_shard()
            written = sink.finish()
    except BaseException:
        sink.abandon()
        raise
    shards = [{"path": f.path.name, "size": f.size, "sha256": f.sha256} for f in written]
    return shards, changes
