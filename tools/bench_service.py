"""`make bench-service`: what the merge service adds on top of the engine, on the 1.1B benchmark model.

The real service merges the benchmark's TinyLlama-1.1B-shaped bf16 base with its r=16 LoRA adapter (generated and
cached by `tools.bench`), in each mode: embedded (`adapter-merge serve` alone) and distributed (`adapter-merge serve`
+ `adapter-merge worker`, Celery on a redis-server of its own on a free loopback port). Both run with the default
timings (`MERGE_POLL_SECONDS` etc.) and two merges at once (`MERGE_WORKER_CONCURRENCY=2`).

How it measures, and why:
- Service against CLI: each round runs the merge as a job (`POST /merge` with `reuse: false`, so it merges) and
  through the CLI (`adapter-merge merge ... --fsync`, as the service always syncs), the two in alternating order,
  after an untimed warm-up round per condition (page cache, checksum caches, the merge processes that the
  previous condition's jobs used up). The job's figure is its `timings.total`, by the server's clock from the
  job's creation (once its request passed preflight) until it succeeded; the client's own view, from sending the
  POST until a poll every 50 ms sees the job succeeded, is printed beside it. The CLI's is its wall time from
  spawn to reap (interpreter start-up and torch import included, as for a user). The difference is of medians.
- Before every run, untimed, the inputs are read once (`cat`); after it the output is deleted (`DELETE /jobs/{id}`
  for a job) and `sync` keeps one run's write-back out of the next.
- Quiet and under load: every measurement is made on the machine as it is ("quiet"), then again with a CPU hog
  (`python -c 'while True: pass'`) pinned to core 0 for the whole condition ("loaded"), so one core of the
  reference machine's two is contended.
- Reused request: `POST /merge` of a request whose result a succeeded job kept (the same digest, `reuse: true`),
  answered with a new job sharing it; round trip at the client, sequentially, 50 times.
- `GET /jobs/{id}` while two merges run: two jobs merge at once; one client polls their records in turn every
  10 ms, and only answers sent while both were running count; once per round, so that the p99 stands on some
  hundreds of answers.

Raw rows go to docs/service-benchmarks.json in the shape `tools.bench` renders ("rows", see its docstring), with
the runs behind them ("raw").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.redis_server import start_redis
from tests.service.harness import FINISHED, TEST_TIMINGS, Api, Proc, launch_server, launch_worker, service_env
from tools.bench import MB, MODEL_1B, REPO, Contender, ensure_models, machine_info, prewarm, run_contender

MODES = ("embedded", "celery")
CONDITIONS = ("quiet", "loaded")
LIMITS_S = {"embedded": 0.5, "celery": 1.0}
"""Largest `timings.total` - CLI wall allowed per mode (issue #12, target 3)."""
REUSE_LIMIT_S = 0.050
GET_P99_LIMIT_S = 0.020
JOB_POLL_SECONDS = 0.05
GET_PAUSE_SECONDS = 0.01
CONCURRENCY = 2
REQUEST = {"base_model": "base", "adapters": ["lora"]}


@dataclass
class Figures:
    """One mode under one condition."""

    mode: str
    condition: str
    job_total: list[float] = field(default_factory=list)
    job_wall: list[float] = field(default_factory=list)
    job_rss: list[int] = field(default_factory=list)
    job_timings: list[dict[str, Any]] = field(default_factory=list)
    cli_wall: list[float] = field(default_factory=list)
    cli_rss: list[int] = field(default_factory=list)
    reuse: list[float] = field(default_factory=list)
    gets: list[float] = field(default_factory=list)


def p99(values: Sequence[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else values[0]


@contextlib.contextmanager
def cpu_hog(enabled: bool) -> Iterator[None]:
    """A busy loop pinned to core 0 while the block runs (the "loaded" condition)."""
    if not enabled:
        yield
        return
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(hog.pid, {0})
        yield
    finally:
        hog.kill()
        hog.wait()


@contextlib.contextmanager
def running_service(mode: str, models: Path, scratch: Path) -> Iterator[Api]:
    """A server (and in distributed mode its Redis and a Celery worker) with the default timings, ready."""
    env = service_env(scratch / "service", models, MERGE_WORKER_CONCURRENCY=str(CONCURRENCY),
                      MERGE_LOG_LEVEL="warning")
    for key in TEST_TIMINGS:  # the production defaults, not the tests' short leases
        del env[key]
    redis = None
    procs: list[Proc] = []
    try:
        if mode == "celery":
            redis = start_redis(scratch)
            env.update(MERGE_REDIS_URL=redis.url(), MERGE_REDIS_PREFIX=f"bench-{uuid.uuid4().hex[:8]}")
            procs.append(launch_worker(env, scratch / "worker.log"))  # /readyz waits for its heartbeat
        server, api = launch_server(env, scratch / "server.log")
        procs.append(server)
        try:
            wait_ready(api, server)
            yield api
        finally:
            api.close()
    finally:
        for proc in procs:
            proc.stop()
        if redis is not None:
            redis.stop()


def wait_ready(api: Api, server: Proc) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not server.alive():
            raise SystemExit(f"the server exited: {server.tail()}")
        with contextlib.suppress(Exception):
            if api.http.get("/readyz", timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"the server was not ready in 120 s: {server.tail()}")


def finished(api: Api, job_id: str) -> dict[str, Any]:
    job = api.job(job_id)
    while job["status"] not in FINISHED:
        time.sleep(JOB_POLL_SECONDS)
        job = api.job(job_id)
    if job["status"] != "succeeded":
        raise SystemExit(f"job {job_id} {job['status']}: {job['error']}")
    return job


def delete(api: Api, job_id: str) -> None:
    response = api.http.delete(f"/jobs/{job_id}")
    if response.status_code != 204:
        raise SystemExit(f"DELETE /jobs/{job_id}: {response.status_code} {response.text}")
    os.sync()


def run_job(api: Api, models: Path, figures: Figures | None, keep: bool = False) -> dict[str, Any]:
    """One merge as a job, from inputs in the page cache; recorded in `figures` unless it is a warm-up."""
    prewarm(models)
    started = time.perf_counter()
    job = finished(api, api.submit({**REQUEST, "reuse": False})["id"])
    wall = time.perf_counter() - started
    if figures is not None:
        figures.job_total.append(job["timings"]["total"])
        figures.job_wall.append(wall)
        figures.job_rss.append(job["metrics"]["peak_rss_bytes"])
        figures.job_timings.append(job["timings"])
    print(f"    job  {job['timings']['total']:6.2f} s (client {wall:5.2f} s)  "
          + " ".join(f"{phase} {job['timings'][phase]:.2f}" for phase in ("queued", "resolve", "merge", "write")),
          flush=True)
    if not keep:
        delete(api, job["id"])
    return job


def run_cli(cli: Contender, models: Path, logs: Path, figures: Figures | None) -> None:
    prewarm(models)
    measured = run_contender(cli, logs)
    if figures is not None:
        figures.cli_wall.append(measured.wall_s)
        figures.cli_rss.append(measured.peak_rss)
    print(f"    cli  {measured.wall_s:6.2f} s", flush=True)


def measure_reuse(api: Api, count: int, figures: Figures) -> None:
    """`count` identical requests answered from the kept job's result (each a new job, deleted afterwards)."""
    ids = []
    for _ in range(count):
        started = time.perf_counter()
        job = api.submit({**REQUEST, "reuse": True})
        figures.reuse.append(time.perf_counter() - started)
        if job["status"] != "succeeded" or not job.get("reused_from"):
            raise SystemExit(f"the request was not answered from a kept result: {job}")
        ids.append(job["id"])
    for job_id in ids:
        api.http.delete(f"/jobs/{job_id}")


def measure_gets(api: Api, models: Path, figures: Figures) -> None:
    """GET /jobs/{id} latencies while two jobs merge at once."""
    prewarm(models)
    ids = [api.submit({**REQUEST, "reuse": False})["id"] for _ in range(CONCURRENCY)]
    while any(api.job(job_id)["status"] == "queued" for job_id in ids):
        time.sleep(JOB_POLL_SECONDS)
    running = True
    while running:
        for job_id in ids:
            started = time.perf_counter()
            job = api.job(job_id)
            elapsed = time.perf_counter() - started
            running = running and job["status"] == "running"
            if running:
                figures.gets.append(elapsed)
            time.sleep(GET_PAUSE_SECONDS)
    for job_id in ids:
        finished(api, job_id)
        delete(api, job_id)


def bench_mode(mode: str, conditions: Sequence[str], runs: int, reuse_count: int, models: Path,
               data_dir: Path) -> list[Figures]:
    scratch = Path(tempfile.mkdtemp(prefix=f"service-{mode}-", dir=data_dir))
    logs = scratch / "logs"
    logs.mkdir()
    cli_out = data_dir / "out" / "service-bench-cli"
    argv = (sys.executable, "-m", "adapter_merge.cli", "merge", str(models / "base"), str(models / "lora"), "--out",
            str(cli_out), "--fsync", "--quiet")
    cli = Contender("cli", "CLI merge --fsync", argv, cli_out)
    results = []
    try:
        with running_service(mode, models, scratch) as api:
            for condition in conditions:
                figures = Figures(mode, condition)
                with cpu_hog(condition == "loaded"):
                    print(f"  {mode}, {condition}: warm-up", flush=True)
                    run_job(api, models, None)
                    run_cli(cli, models, logs, None)
                    for rnd in range(runs):
                        print(f"  {mode}, {condition}: run {rnd + 1}/{runs}", flush=True)
                        last = rnd == runs - 1
                        if rnd % 2:
                            run_cli(cli, models, logs, figures)
                            kept = run_job(api, models, figures, keep=last)
                        else:
                            kept = run_job(api, models, figures, keep=last)
                            run_cli(cli, models, logs, figures)
                    measure_reuse(api, reuse_count, figures)
                    delete(api, kept["id"])
                    for _ in range(runs):
                        measure_gets(api, models, figures)
                results.append(figures)
                print(summary(figures), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def rows_of(figures: Figures) -> list[dict[str, Any]]:
    """Rows in tools.bench's shape for other benchmarks: {model, operation, median_s, min_s, peak_rss_mb, ratio_to,
    note}."""
    where = f"{figures.mode}, {figures.condition}"
    runs = f"median of {len(figures.job_total)} interleaved runs"
    job, cli = statistics.median(figures.job_total), statistics.median(figures.cli_wall)
    limit = LIMITS_S[figures.mode]
    paired = min(total - wall for total, wall in zip(figures.job_total, figures.cli_wall, strict=True))
    reuse_median, get_p99 = statistics.median(figures.reuse), p99(figures.gets)
    return [
        _row(f"service {where}: job timings.total", figures.job_total, max(figures.job_rss), runs,
             ratio_to={"CLI --fsync": round(job / cli, 3)}),
        _row(f"service {where}: client, POST until seen succeeded", figures.job_wall, None, runs),
        _row(f"CLI merge --fsync ({where} round)", figures.cli_wall, max(figures.cli_rss), runs),
        {"model": MODEL_1B.label, "operation": f"service {where}: timings.total - CLI wall",
         "median_s": round(job - cli, 3), "min_s": round(paired, 3), "peak_rss_mb": None,
         "note": f"difference of the medians (min: of one round's pair); limit {limit} s: "
                 f"{_verdict(job - cli <= limit)}"},
        _row(f"service {where}: reused request, POST /merge", figures.reuse, None,
             f"{len(figures.reuse)} requests, p99 {p99(figures.reuse) * 1000:.1f} ms; limit "
             f"{REUSE_LIMIT_S * 1000:.0f} ms (median): {_verdict(reuse_median <= REUSE_LIMIT_S)}"),
        _row(f"service {where}: GET /jobs/{{id}} while two merges run", figures.gets, None,
             f"{len(figures.gets)} requests, p99 {get_p99 * 1000:.1f} ms; limit {GET_P99_LIMIT_S * 1000:.0f} ms "
             f"(p99): {_verdict(get_p99 <= GET_P99_LIMIT_S)}"),
    ]


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _row(operation: str, values: list[float], peak_rss: int | None, note: str,
         ratio_to: dict[str, float] | None = None) -> dict[str, Any]:
    return {"model": MODEL_1B.label, "operation": operation, "median_s": round(statistics.median(values), 4),
            "min_s": round(min(values), 4), "peak_rss_mb": None if peak_rss is None else round(peak_rss / MB),
            **({"ratio_to": ratio_to} if ratio_to else {}), "note": note}


def summary(figures: Figures) -> str:
    lines = []
    for row in rows_of(figures):
        rss = "" if row["peak_rss_mb"] is None else f", peak RSS {row['peak_rss_mb']} MB"
        lines.append(f"  {row['operation']}: median {row['median_s']:.3f} s, min {row['min_s']:.3f} s{rss}; "
                     f"{row['note']}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_service", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="interleaved rounds per mode and condition (default 5)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    parser.add_argument("--reuse-requests", type=int, default=50, help="reused requests measured (default 50)")
    parser.add_argument("--data-dir", type=Path, default=REPO / "bench-data",
                        help="generated models (shared with tools.bench), outputs and scratch (default bench-data/)")
    parser.add_argument("--json", type=Path, default=None,
                        help="raw rows' file (default: docs/service-benchmarks.json for a full run, else none)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.reuse_requests < 1:
        parser.error("--runs and --reuse-requests must be at least 1")
    full = args.runs >= 5 and set(args.modes) == set(MODES) and set(args.conditions) == set(CONDITIONS)
    if args.json is None and full:
        args.json = REPO / "docs" / "service-benchmarks.json"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir = args.data_dir.resolve()
    # The CLI's input-checksum cache, as in tools.bench: filled by the warm-up round.
    os.environ["ADAPTER_MERGE_CACHE"] = str(data_dir / "checksum-cache")
    models = ensure_models(MODEL_1B, data_dir)
    results = [figures for mode in args.modes
               for figures in bench_mode(mode, args.conditions, args.runs, args.reuse_requests, models, data_dir)]
    rows = [row for figures in results for row in rows_of(figures)]
    print()
    for row in rows:
        print(f"{row['operation']:<72} {row['median_s']:8.3f} s  {row['note']}")
    if args.json is not None:
        raw = {"machine": machine_info(), "runs": args.runs, "rows": rows,
               "raw": [figures.__dict__ for figures in results]}
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
