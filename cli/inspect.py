"""`adapter-merge inspect`: what a merge would do, without doing it.

It runs the engine's planner only (headers and configs: no tensor data, no torch, nothing written), so every
refusal `merge` would give up front, it gives too, with the same message and exit status.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from adapter_merge.cli.plan_args import adapter_specs
from adapter_merge.worker.engine import MergeError, MergeOptions, plan_merge
from adapter_merge.worker.engine.plan_report import describe_plan

EXIT_OK, EXIT_FAILED = 0, 1
KIND_NAMES = {"lora": "LoRA", "dora": "DoRA", "embedding": "embedding LoRA", "lora_bias": "lora_bias",
              "trainable_tokens": "trainable tokens", "replaced": "replaced whole (modules_to_save, saved layers)"}


def run_inspect(args: argparse.Namespace) -> int:
    adapters = adapter_specs(args)
    try:
        plan = plan_merge(Path(args.base), adapters, MergeOptions(dtype=args.dtype, max_shard_size=args.max_shard_size))
    except (MergeError, OSError) as error:
        print(f"adapter-merge: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    report = describe_plan(plan)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return EXIT_OK


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def render(report: dict[str, Any]) -> str:
    """The plan on one screen: base, adapters, output, files, notes."""
    base, output = report["base"], report["output"]
    lines = [f"base: {base['path']} ({base['model_type'] or 'unknown model type'}, {base['tensors']} tensors, "
             f"{_size(base['bytes'])})"]
    for adapter in report["adapters"]:
        kinds = ", ".join(f"{KIND_NAMES[kind]} {count}" for kind, count in adapter["kinds"].items()) or "nothing"
        lines.append(f"adapter {adapter['index']}: {adapter['path']} (weight {adapter['weight']:g}, "
                     f"r={adapter['r']}, lora_alpha={adapter['lora_alpha']:g}"
                     f"{', rsLoRA' if adapter['use_rslora'] else ''}): {adapter['tensors']} tensors in "
                     f"{adapter['modules']} modules: {kinds}")
    dtypes = ", ".join(f"{dtype} x{count}" for dtype, count in output["tensor_dtypes"].items())
    lines.append(f"output: dtype {output['dtype']} ({dtypes}), {output['tensors']} tensors of which "
                 f"{output['tensors_changed']} changed, {_size(output['bytes'])} of tensor data in "
                 f"{len(output['shards'])} shard(s)")
    lines += [f"  {shard['name']}: {shard['tensors']} tensors, {_size(shard['bytes'])}" for shard in output["shards"]]
    lines.append(f"copied: {', '.join(output['copied']) or 'nothing'}")
    lines += [f"skipped: {entry['path']}: {entry['reason']}" for entry in output["skipped"]]
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)
