"""The arguments `merge` and `inspect` share, and the engine call they stand for.

A bad `--weights` or `--max-shard-size`, or a `--weights` count that does not match the adapters, is a usage
error (argparse's: the usage line, one message, exit 2), found before any model file is opened.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adapter_merge.worker.engine import AdapterSpec, InputError, MergeOptions, parse_size
from adapter_merge.worker.engine.spec import OUTPUT_DTYPES


def _weights(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _shard_size(text: str) -> int:
    """A positive size, as the engine reads and checks it (its message says what is wrong)."""
    try:
        size = parse_size(text)
        MergeOptions(max_shard_size=size)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return size


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="base model folder (config.json + safetensors)")
    parser.add_argument("adapters", nargs="+", metavar="adapter", help="PEFT adapter folder(s), applied in order")
    parser.add_argument("--dtype", default="auto", choices=OUTPUT_DTYPES,
                        help=f"output dtype, one of {', '.join(OUTPUT_DTYPES)}: auto keeps each tensor's own, "
                        "the others write every float tensor in that dtype (default: auto)")
    parser.add_argument("--weights", type=_weights,
                        help="comma-separated multiplier per adapter, e.g. 1.0,0.5 (default 1.0 each)")
    parser.add_argument("--max-shard-size", type=_shard_size,
                        help="re-shard the output, e.g. 5GB, 500MB, 2GiB (default: keep the base's shards)")
    parser.set_defaults(usage_error=parser.error)  # for the checks that need several arguments at once


def adapter_specs(args: argparse.Namespace) -> list[AdapterSpec]:
    """Each adapter with its --weights multiplier; a count that does not match is a usage error (exit 2)."""
    weights = args.weights or [1.0] * len(args.adapters)
    if len(weights) != len(args.adapters):
        args.usage_error(f"argument --weights: {len(weights)} weights given for {len(args.adapters)} adapters")
    return [AdapterSpec(Path(path), weight) for path, weight in zip(args.adapters, weights, strict=True)]
