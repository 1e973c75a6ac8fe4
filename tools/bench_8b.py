"""`make bench-8b`: issue #12's 8B-class target, our merge against `cp -r` and PEFT on a Llama-3-8B-shaped base.

Not in CI: the bf16 base is about 16 GB (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads,
vocab 128256, 5 GB shards), generated once under `bench-data/llama-3-8b` with r=16 LoRA and DoRA adapters on
all seven projections, and each run writes another 16 GB (one output at a time, deleted after the run).

Measuring is `tools.bench`'s (real commands, wall time from spawn to reap, whole-tree peak RSS, inputs re-read
untimed before every run, untimed `sync` after it, one untimed warm-up round, contenders interleaved, medians),
with what the size changes:
- The output outgrows the page cache's dirty limits, so `cp -r` and our merge both pay real writes. Neither
  flushes at the end: our CLI runs as users run it, without `--fsync` (its default), and `cp -r` does not flush
  either; what is still dirty when a run ends is written back in the untimed `sync` for both.
- PEFT (`tools.peft_merge`: load, `merge_and_unload()`, `save_pretrained()`) runs once per adapter, after the
  interleaved rounds and without a warm-up: on 16 GB it takes minutes and may not fit at all. It runs in a
  memory cgroup of its own (cgroup v1, nested in the one this benchmark runs in), limited to the machine's RAM
  minus a reserve, so that the kernel stops it there instead of the machine running out; its row says whether
  it finished, or when and at what memory it was killed. The cgroup is charged with what PEFT allocates and the
  page cache it brings in (its output), not with the base's pages the untimed re-read already cached, which
  stay reclaimable; its peak RSS still counts those it maps, so the RSS can exceed the cgroup's peak.

Raw rows go to `docs/benchmarks-8b.json` (`tools.bench` renders them into the docs) and are printed with the
targets.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from tools.bench import (
    GB,
    MB,
    REPO,
    BenchModel,
    Contender,
    Result,
    Target,
    bench_model,
    contenders,
    ensure_models,
    find,
    machine_info,
    model_bytes,
    prewarm,
    run_contender,
    table_rows,
    target_rows,
    text_table,
)

GIB = 2**30
MODEL_8B = BenchModel("8B", "llama-3-8b", ("--tiled",))
"""Tiled: one random 8 MB block per tensor, repeated (see `tools.synthetic`), so the 16 GB are written at disk
speed instead of drawing 8 billion normal values; the merge's work does not depend on the values."""
TIME_VS_CP = 1.5
RSS_LIMIT_GB = 0.5
PEFT_RESERVE_GIB = 2.0
"""Left to the rest of the machine (this benchmark, the OS, other users) when PEFT runs in its cage."""
MEMCG_ROOT = Path("/sys/fs/cgroup/memory")
CAGED = ('cg=$1 status=$2 seconds=$3; shift 3; echo $$ > "$cg/cgroup.procs" || exit 1; '
         'timeout "$seconds" "$@"; echo $? > "$status"')
"""`sh -c` script: join the cgroup, run the command under a time limit, record its exit status. The shell stays
the measured process and exits 0, so a PEFT run that is killed is still measured (wall time, peak RSS)."""
TIMEOUT_STATUS = 124
KILLED_STATUS = 128 + 9


@dataclass(frozen=True)
class Cage:
    """A cgroup v1 memory controller folder: v1 because that is the memory controller this machine has."""

    path: Path

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def peak(self) -> int:
        """Peak usage, page cache the members read or wrote included (reclaimable, unlike RSS)."""
        return int((self.path / "memory.max_usage_in_bytes").read_text())


@contextlib.contextmanager
def memory_cage(name: str, limit: int) -> Iterator[Cage]:
    """A fresh memory cgroup limited to `limit` bytes, removed afterwards. It is made inside this process's own
    memory cgroup, so whatever accounts for or limits the benchmark still covers PEFT."""
    own = next((line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.split(":", 2)[1] == "memory"), None)
    if own is None or not MEMCG_ROOT.is_dir():
        raise RuntimeError(f"PEFT runs in a cgroup v1 memory controller ({MEMCG_ROOT}), which this machine does "
                           "not have; run with --skip-peft")
    path = MEMCG_ROOT / own.lstrip("/") / name
    path.mkdir()
    try:
        (path / "memory.limit_in_bytes").write_text(str(limit))
        yield Cage(path)
    finally:
        path.rmdir()


@dataclass
class Row:
    """One line of the table: a result, what its numbers alone do not say, and where it ran."""

    result: Result
    note: str = ""
    """Empty for a run that finished: `tools.bench`'s headline table reads a note as 'did not finish'."""
    cgroup: str = ""
    """PEFT's memory cage: the limit and the peak usage the kernel recorded."""


def run_peft(model: BenchModel, c: Contender, limit: int, timeout_s: int, data_dir: Path) -> Row:
    """One PEFT run in its memory cage; a kill by the cage's OOM killer or by the timeout is a result too."""
    log_dir = data_dir / "logs"
    status_file = log_dir / f"{c.out.name}.status"
    status_file.unlink(missing_ok=True)
    print(f"  {model.label}: {c.label} (once, memory limit {limit / GIB:.1f} GiB) ...", end=" ", flush=True)
    with memory_cage(f"adapter-merge-bench-{os.getpid()}-{c.key}", limit) as cage:
        caged = dataclasses.replace(c, argv=("sh", "-c", CAGED, "caged", str(cage.path), str(status_file),
                                             str(timeout_s), *c.argv))
        prewarm(model.folder(data_dir))
        m = run_contender(caged, log_dir)
        peak, oom_kills = cage.peak(), cage.oom_kills()
    status = int(status_file.read_text()) if status_file.exists() else None
    used = f"cgroup v1 memory limit {limit / GIB:.1f} GiB, peak usage {peak / GIB:.1f} GiB"
    if status == 0:
        note = ""
    elif status == KILLED_STATUS and oom_kills:
        note = f"out of memory: killed by the cgroup's OOM killer after {m.wall_s:.0f} s; {used}"
    elif status == TIMEOUT_STATUS:
        note = f"timeout: stopped after {timeout_s} s; {used}"
    else:
        tail = (log_dir / f"{c.out.name}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(c.argv)} exited with {status}; log tail:\n{tail}")
    print(f"{m.wall_s:.2f} s, {m.peak_rss / MB:.0f} MB: {note or 'finished'} ({used})", flush=True)
    return Row(Result(model.label, c.key, c.label, [m]), note, used)


def evaluate(model: BenchModel, rows: list[Row]) -> list[Target]:
    """The issue's 8B targets, from medians of this run."""
    results = [r.result for r in rows]
    cp = find(results, model.label, "cp")
    targets = []
    for key in ("ours-lora", "ours-dora"):
        ours = find(results, model.label, key)
        if ours is None:
            continue
        if cp:
            x = ours.median_s / cp.median_s
            targets.append(Target(f"{ours.label} time vs cp -r ({model.label})", f"{x:.2f}x",
                                  f"<= {TIME_VS_CP}x", x <= TIME_VS_CP))
        gb = ours.peak_rss / GB
        targets.append(Target(f"peak RSS, {ours.label} ({model.label})", f"{gb:.2f} GB", f"<= {RSS_LIMIT_GB} GB",
                              gb <= RSS_LIMIT_GB))
    return targets


def ratios(row: Row, rows: list[Row]) -> dict[str, float]:
    """This row's median time over the references': cp -r, and for PEFT our merge of the same adapter."""
    r = row.result
    refs = {"cp": find([x.result for x in rows], r.model, "cp")}
    if r.key.startswith("peft-"):
        refs["ours"] = find([x.result for x in rows], r.model, r.key.replace("peft-", "ours-"))
    return {name: round(r.median_s / ref.median_s, 3) for name, ref in refs.items() if ref and ref is not r}


def write_json(path: Path, rows: list[Row], info: dict[str, object], complete: bool) -> None:
    """Raw rows in `tools.bench`'s schema for other benchmarks (see its docstring), plus key, cgroup, runs."""
    data = {**info, "complete": complete, "rows": [
        {"model": row.result.model, "operation": row.result.label,
         "median_s": round(row.result.median_s, 3), "min_s": round(row.result.min_s, 3),
         "peak_rss_mb": round(row.result.peak_rss / MB), "ratio_to": ratios(row, rows), "note": row.note,
         "key": row.result.key, "cgroup": row.cgroup, "runs": [dataclasses.asdict(m) for m in row.result.runs]}
        for row in rows]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def print_report(model: BenchModel, rows: list[Row]) -> None:
    table = table_rows([r.result for r in rows])
    print()
    print(text_table([[*table[0], "note"], *[[*line, row.note or row.cgroup]
                                             for line, row in zip(table[1:], rows, strict=True)]]))
    print()
    print(text_table(target_rows(evaluate(model, rows))))


def uncommitted() -> list[str]:
    """Tracked files changed in the working tree: the editable install measures those, not just the commit."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                            text=True).stdout
    return [line[3:] for line in status.splitlines()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_8b", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="measured rounds of cp -r and ours (default 3)")
    parser.add_argument("--skip-peft", action="store_true", help="do not run the PEFT baseline")
    parser.add_argument("--peft-memory-gib", type=float,
                        default=round(psutil.virtual_memory().total / GIB - PEFT_RESERVE_GIB, 1),
                        help=f"PEFT's cgroup memory limit (default: this machine's RAM - {PEFT_RESERVE_GIB} GiB)")
    parser.add_argument("--peft-timeout", type=int, default=1800, help="seconds per PEFT run (default 1800)")
    parser.add_argument("--preset", default=MODEL_8B.preset,
                        help="a smaller tools.shapes preset, to try the tooling (give it its own --data-dir)")
    parser.add_argument("--data-dir", type=Path, default=REPO / "bench-data",
                        help="generated models, outputs and logs (default bench-data/, reused between runs)")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "benchmarks-8b.json",
                        help="where the raw rows go (default docs/benchmarks-8b.json)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    model = MODEL_8B if args.preset == MODEL_8B.preset else BenchModel(args.preset, args.preset, ("--tiled",))
    data_dir = args.data_dir.resolve()
    # Our CLI's input-checksum cache, as in tools.bench: filled by the warm-up round.
    os.environ["ADAPTER_MERGE_CACHE"] = str(data_dir / "checksum-cache")
    folder = ensure_models(model, data_dir)
    tensor_bytes = model_bytes(folder / "base")
    limit = int(args.peft_memory_gib * GIB)
    info: dict[str, object] = {
        "command": " ".join(["python -m tools.bench_8b", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(), "uncommitted": uncommitted(), "runs": args.runs,
        "tensor_bytes": {model.label: tensor_bytes},
        "ours_fsync": False,
        "peft_memory_limit": None if args.skip_peft else f"cgroup v1 memory.limit_in_bytes {args.peft_memory_gib} GiB"}
    items = contenders(model, data_dir, with_peft=not args.skip_peft)
    measured = [c for c in items if not c.key.startswith("peft-")]
    print(f"{model.label}: {tensor_bytes / GB:.2f} GB of tensors, {len(measured)} contenders x ({args.runs} runs + "
          f"1 warm-up){'' if args.skip_peft else ', then PEFT LoRA and DoRA once each'}", flush=True)
    rows = [Row(r) for r in bench_model(model, measured, args.runs, data_dir)]
    write_json(args.json, rows, info, complete=args.skip_peft)
    for c in items:
        if c.key.startswith("peft-"):
            rows.append(run_peft(model, c, limit, args.peft_timeout, data_dir))
            write_json(args.json, rows, info, complete=c is items[-1])
    print_report(model, rows)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
