"""`adapter-merge`: one command line for one-off merges, the API server and the Celery worker.

Each subcommand imports its layer only when it runs, so `serve` never pulls in torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from adapter_merge.cli.remote import REMOTE_COMMANDS, add_remote_parsers, run_remote


def _add_merge_parser(subparsers: argparse._SubParsersAction) -> None:
    merge = subparsers.add_parser("merge", help="merge adapters into a base model folder")
    merge.add_argument("base", help="base model folder (config.json + safetensors)")
    merge.add_argument("adapters", nargs="+", metavar="adapter", help="PEFT adapter folder(s), applied in order")
    merge.add_argument("--out", required=True, help="output folder; must not exist unless --overwrite")
    merge.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    merge.add_argument("--weights", help="comma-separated multiplier per adapter, default 1.0 each")
    merge.add_argument("--max-shard-size", help="re-shard the output, e.g. 5GB; default keeps the base layout")
    merge.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    merge.add_argument("--fsync", action="store_true", help="flush the output to disk before finishing")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the HTTP API (embedded worker when no Redis is set)")
    serve.add_argument("--host", default=None, help="listen address (default from MERGE_HOST)")
    serve.add_argument("--port", type=int, default=None, help="listen port (default from MERGE_PORT)")
    serve.add_argument("--fd", type=int, default=None,
                       help="serve on this already-bound, inherited socket instead of --host/--port "
                       "(a supervisor or test binds the port once and hands it down)")


def _add_worker_parser(subparsers: argparse._SubParsersAction) -> None:
    worker = subparsers.add_parser("worker", help="run a Celery worker that executes merge jobs")
    worker.add_argument("--concurrency", type=int, default=None, help="merges at once (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapter-merge", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_merge_parser(subparsers)
    _add_serve_parser(subparsers)
    _add_worker_parser(subparsers)
    add_remote_parsers(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in REMOTE_COMMANDS:
        return run_remote(args)
    if args.command == "merge":
        from adapter_merge.cli.merge import run_merge

        return run_merge(args)
    if args.command == "serve":
        from adapter_merge.cli.serve import serve

        return serve(host=args.host, port=args.port, fd=args.fd)
    from adapter_merge.worker.celery_app import run_worker

    return run_worker(concurrency=args.concurrency)


if __name__ == "__main__":
    sys.exit(main())
