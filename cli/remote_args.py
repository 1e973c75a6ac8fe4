"""The arguments of `adapter-merge submit / status / jobs / cancel / download` (cli/remote.py runs them).

Apart from the commands that run them, so that `adapter-merge merge` and `serve` do not import httpx and the
client just to build their parser.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"
REMOTE_COMMANDS = ("submit", "status", "jobs", "cancel", "download")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def _weights(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def add_remote_parsers(subparsers: argparse._SubParsersAction) -> None:
    """The client commands, each with --url/MERGE_URL, --token/MERGE_TOKEN and --json."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("MERGE_URL", DEFAULT_URL),
                        help=f"the service (default $MERGE_URL, else {DEFAULT_URL})")
    common.add_argument("--token", default=os.environ.get("MERGE_TOKEN"),
                        help="API key or JWT (default $MERGE_TOKEN; none when the service runs without auth)")
    common.add_argument("--json", action="store_true", help="print machine-readable JSON only")

    submit = subparsers.add_parser("submit", parents=[common], help="submit a merge to a service")
    submit.add_argument("base", help="base model reference (a path inside the service's model roots, hf://, s3://, "
                        "models:/)")
    submit.add_argument("adapters", nargs="+", metavar="adapter", help="adapter references, applied in order")
    submit.add_argument("--weights", type=_weights, help="comma-separated multiplier per adapter, default 1.0 each")
    submit.add_argument("--dtype", help="auto (keep the base's, default), bfloat16, float16 or float32")
    submit.add_argument("--max-shard-size", help="re-shard the output, e.g. 5GB; default keeps the base layout")
    submit.add_argument("--publish", metavar="URI", help="also publish the result (models:/, s3://, hf://)")
    submit.add_argument("--callback", metavar="URL", help="URL to notify when the job ends (a signed POST)")
    submit.add_argument("--no-reuse", action="store_true", help="merge again even if an identical result exists")
    submit.add_argument("--wait", action="store_true", help="wait until it has succeeded, with a progress bar")
    submit.add_argument("--download", metavar="DIR", type=Path, help="then download the result into DIR (waits)")

    status = subparsers.add_parser("status", parents=[common], help="show a job of a service")
    status.add_argument("job_id", metavar="ID")
    jobs = subparsers.add_parser("jobs", parents=[common], help="list the jobs of a service, newest first")
    jobs.add_argument("--status", action="append", choices=STATUSES, help="only these (repeatable)")
    jobs.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    cancel = subparsers.add_parser("cancel", parents=[common], help="cancel a job of a service")
    cancel.add_argument("job_id", metavar="ID")
    download = subparsers.add_parser("download", parents=[common], help="download a succeeded job's files")
    download.add_argument("job_id", metavar="ID")
    download.add_argument("dest", metavar="DIR", type=Path)
