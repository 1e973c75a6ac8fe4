"""`adapter-merge`: one command line for one-off merges and their preview, the API server and the Celery worker.

Each subcommand imports its layer only when it runs, so `serve` never pulls in torch.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Sequence

from adapter_merge.cli.metrics_dir import use_metrics_dir
from adapter_merge.cli.plan_args import add_plan_arguments
from adapter_merge.cli.remote_args import REMOTE_COMMANDS, add_remote_parsers


def _add_merge_parser(subparsers: argparse._SubParsersAction) -> None:
    merge = subparsers.add_parser("merge", help="merge adapters into a base model folder")
    add_plan_arguments(merge)
    merge.add_argument("--out", required=True, help="output folder; must not exist unless --overwrite")
    merge.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    merge.add_argument("--fsync", action="store_true", help="flush the output to disk before finishing")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_inspect_parser(subparsers: argparse._SubParsersAction) -> None:
    inspect = subparsers.add_parser("inspect", help="show what a merge would do, without writing anything")
    add_plan_arguments(inspect)
    inspect.add_argument("--json", action="store_true", help="print the plan as JSON")


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _socket_fd(text: str) -> int:
    """An inherited, open socket's descriptor (anything else would fail deep inside the server)."""
    try:
        is_socket = stat.S_ISSOCK(os.fstat(int(text)).st_mode)
    except (ValueError, OSError):
        is_socket = False
    if not is_socket:
        raise argparse.ArgumentTypeError(f"{text!r} is not the descriptor of an open socket")
    return int(text)


class _ServeHelp(argparse.Action):
    """`serve --help` with the settings it reads as its epilog, listed from the settings class itself (so the
    list cannot go stale) and imported only when help is asked for: the server's modules are heavy."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        from adapter_merge.cli.serve import settings_epilog

        parser.epilog = settings_epilog()
        parser.print_help()
        parser.exit()


def _add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the HTTP API (embedded worker when no Redis is set)",
                                  add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("-h", "--help", action=_ServeHelp, help="show this help and the settings serve reads")
    serve.add_argument("--host", default=None, help="listen address (default from MERGE_HOST)")
    serve.add_argument("--port", type=_port, default=None, help="listen port (default from MERGE_PORT)")
    serve.add_argument("--fd", type=_socket_fd, default=None,
                       help="serve on this already-bound, inherited socket instead of --host/--port "
                       "(a supervisor or test binds the port once and hands it down)")


def _add_worker_parser(subparsers: argparse._SubParsersAction) -> None:
    worker = subparsers.add_parser("worker", help="run a Celery worker that executes merge jobs")
    worker.add_argument("--concurrency", type=_positive, default=None, help="merges at once (default 1)")
    worker.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics on this port at /metrics (default: none)")
    worker.add_argument("--metrics-host", default="0.0.0.0", help="listen address of the metrics (default all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapter-merge", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_merge_parser(subparsers)
    _add_inspect_parser(subparsers)
    _add_serve_parser(subparsers)
    _add_worker_parser(subparsers)
    add_remote_parsers(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in REMOTE_COMMANDS:
        from adapter_merge.cli.remote import run_remote  # httpx and the client: only for these commands

        return run_remote(args)
    if args.command == "merge":
        from adapter_merge.cli.merge import run_merge

        return run_merge(args)
    if args.command == "inspect":
        from adapter_merge.cli.inspect import run_inspect

        return run_inspect(args)
    if args.command == "serve" or args.metrics_port is not None:  # a worker without a metrics port keeps none
        use_metrics_dir(args.command)  # before the server or worker imports prometheus_client
    if args.command == "serve":
        from adapter_merge.cli.serve import serve

        return serve(host=args.host, port=args.port, fd=args.fd)
    from adapter_merge.worker.celery_app import run_worker

    metrics = None if args.metrics_port is None else (args.metrics_host, args.metrics_port)
    return run_worker(concurrency=args.concurrency, metrics_address=metrics)


if __name__ == "__main__":
    sys.exit(main())
