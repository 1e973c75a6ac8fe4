"""`adapter-merge submit / status / jobs / cancel / download`: a merge service from the shell, through
`adapter_merge.client`.

Errors print the problem's detail on one line and exit 1 (2 for a usage error); `--json` prints only JSON on
stdout. `--wait` shows tqdm's bar with an ETA on stderr: tqdm has no dependencies of its own and already comes
with huggingface_hub, where rich would add two packages for one bar.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import httpx

from adapter_merge.cli.progress import PhaseBars
from adapter_merge.client import (
    ApiError,
    ChecksumMismatch,
    Client,
    Job,
    JobNotSucceeded,
    WaitTimeout,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class ProgressBar:
    """A bar per phase of the job (downloading inputs, merging, publishing), over its bytes."""

    def __init__(self) -> None:
        self.bars = PhaseBars(only_on_terminal=False)

    def __call__(self, job: Job) -> None:
        progress = job.progress
        if progress.phase != "queued" and progress.bytes_total:
            self.bars.show(progress.phase, progress.bytes_done, progress.bytes_total)

    def close(self) -> None:
        self.bars.close()


def _summary(job: Job) -> str:
    total = job.data.get("timings", {}).get("total")
    took = f" in {total:.1f} s" if total is not None else ""
    size = sum(artifact.size for artifact in job.artifacts)
    files = f": {len(job.artifacts)} files, {size / 1e6:.1f} MB" if job.artifacts else ""
    return f"job {job.id} {job.status}{took}{files}"


def _show(job: Job) -> str:
    request, progress = job.data.get("request", {}), job.progress
    lines = [f"job       {job.id}", f"status    {job.status} ({progress.phase}, {progress.fraction:.0%}, "
             f"{progress.tensors_done}/{progress.tensors_total} tensors)",
             f"base      {request.get('base_model')}",
             f"adapters  {', '.join(item['ref'] for item in request.get('adapters', []))}",
             f"created   {job.data.get('created_at')}"]
    if job.error:
        lines.append(f"error     {job.error.get('detail')}")
    lines += [f"artifact  {artifact.path} ({artifact.size} bytes, sha256 {artifact.sha256})"
              for artifact in job.artifacts]
    return "\n".join(lines)


def _submit(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    job = client.submit(args.base, args.adapters, weights=args.weights, output_dtype=args.dtype,
                        max_shard_size=args.max_shard_size, publish=args.publish, callback_url=args.callback,
                        reuse=not args.no_reuse)
    if not (args.wait or args.download):
        return job.data, f"submitted job {job.id} ({job.status})"
    bar = ProgressBar() if not args.json else None
    try:
        job = client.wait(job, on_progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if args.download is None:
        return job.data, _summary(job)
    files = client.download(job, args.download)
    return {**job.data, "files": [str(path) for path in files]}, f"{_summary(job)}\ndownloaded to {args.download}"


def _run(client: Client, args: argparse.Namespace) -> tuple[Any, str]:
    """The command's JSON document and its text for people."""
    if args.command == "submit":
        return _submit(client, args)
    if args.command == "status":
        job = client.get(args.job_id)
        return job.data, _show(job)
    if args.command == "jobs":
        listed = list(client.list(status=args.status, limit=args.limit))
        rows = [f"{job.id}  {job.status:9}  {job.data.get('created_at', '')[:19]}  "
                f"{job.data.get('request', {}).get('base_model')}" for job in listed]
        return [job.data for job in listed], "\n".join(rows) or "no jobs"
    if args.command == "cancel":
        job = client.cancel(args.job_id)
        said = "cancelled" if job.status == "cancelled" else f"{job.status}, asked to stop"
        return job.data, f"job {job.id}: {said}"
    files = client.download(args.job_id, args.dest)
    return {"job": args.job_id, "files": [str(path) for path in files]}, \
        f"downloaded {len(files)} files to {args.dest}"


def run_remote(args: argparse.Namespace) -> int:
    if args.command == "submit" and args.weights is not None and len(args.weights) != len(args.adapters):
        print(f"adapter-merge submit: error: --weights: {len(args.weights)} weights for {len(args.adapters)} "
              "adapters", file=sys.stderr)
        return EXIT_USAGE
    try:
        with Client(args.url, token=args.token) as client:
            document, text = _run(client, args)
    except (ApiError, JobNotSucceeded, WaitTimeout, ChecksumMismatch) as error:
        print(f"adapter-merge: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_FAILED
    except httpx.TransportError as error:
        print(f"adapter-merge: cannot reach {args.url}: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(document) if args.json else text)
    return EXIT_OK

