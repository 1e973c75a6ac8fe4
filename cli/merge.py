"""`adapter-merge merge`: the engine on the command line, with a progress bar and a one-screen summary."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NamedTuple

from adapter_merge.cli.plan_args import adapter_specs
from adapter_merge.cli.progress import PhaseBars
from adapter_merge.worker.engine import (
    AdapterSpec,
    MergeCancelled,
    MergeError,
    MergeOptions,
    OutputExistsError,
    Progress,
    merge,
)

EXIT_OK, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 130


class ProgressBar:
    """The merge's bar over the output bytes, with rate and ETA; silent when stderr is not a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.bars = PhaseBars(only_on_terminal=True) if enabled else None

    def __call__(self, progress: Progress) -> None:
        if self.bars is None:
            return
        self.bars.show("merging", progress.bytes_done, progress.bytes_total)
        if progress.tensors_done == progress.tensors_total:
            self.bars.close()


def checksum_cache_dir() -> Path:
    """Where the CLI remembers input checksums: $ADAPTER_MERGE_CACHE, else the user's cache folder."""
    if folder := os.environ.get("ADAPTER_MERGE_CACHE"):
        return Path(folder)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adapter-merge"


class MergeCall(NamedTuple):
    """The engine call a `merge` command line stands for."""

    base: Path
    adapters: list[AdapterSpec]
    out: Path
    options: MergeOptions


def merge_call(args: argparse.Namespace) -> MergeCall:
    """The engine's inputs from parsed arguments; a --weights count that does not fit is a usage error."""
    adapters = adapter_specs(args)
    options = MergeOptions(dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                           fsync=args.fsync, checksum_cache=checksum_cache_dir())
    return MergeCall(Path(args.base), adapters, Path(args.out), options)


def run_merge(args: argparse.Namespace) -> int:
    try:
        call = merge_call(args)
        report = merge(call.base, call.adapters, call.out, call.options, progress=ProgressBar(not args.quiet))
    except MergeCancelled:
        print("adapter-merge: cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except OutputExistsError as error:
        print(f"adapter-merge: error: {error.file}: output folder already exists; pass --overwrite to replace it",
              file=sys.stderr)
        return EXIT_FAILED
    except (MergeError, OSError) as error:  # OSError: an input that fails to read while merging
        print(f"adapter-merge: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("adapter-merge: interrupted; no output was written", file=sys.stderr)
        return EXIT_CANCELLED
    seconds, gigabytes = report.timings["total"], report.bytes_written / 1e9
    print(
        f"merged {report.tensors_merged} of {report.tensors_total} tensors "
        f"({report.tensors_copied} copied unchanged) into {report.output_dir}\n"
        f"wrote {gigabytes:.3f} GB in {seconds:.2f} s ({gigabytes / max(seconds, 1e-9):.2f} GB/s), "
        f"peak memory {report.peak_rss_bytes / 2**20:.0f} MiB"
    )
    for note in report.notes:
        print(f"note: {note}")
    return EXIT_OK
