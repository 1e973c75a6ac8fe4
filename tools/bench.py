"""`make bench`: our merge against the machine's floor and PEFT, on generated Llama-shaped models.

Every measured operation is a real command in its own process: the floor (`python -m tools.hash_floor`:
import torch, then sha256 of the base's shards, as many bytes as the merged output's, on one core from the
page cache), `cp -r` of the base and `dd oflag=direct` of its shards (references: the page cache's writes and
the disk's), `python -c 'import torch'`, our CLI (`python -m adapter_merge.cli merge ... --quiet`) and `python -m
tools.peft_merge` (PEFT's load + merge_and_unload + save_pretrained). The 1.1B targets are issue #12's: our LoRA
merge <= 1.3x the floor, our DoRA <= 1.1x our LoRA, peak RSS <= 0.5 GB.

How it measures, and why:
- Wall time: from spawning the process to reaping it, so interpreter start-up and imports count, as they do
  for a user.
- Peak RSS: the larger of (a) the summed RSS of the process and all its descendants, sampled every 20 ms with
  psutil (catches multi-process trees), and (b) the child's `ru_maxrss` from `wait4` (the kernel's exact
  per-process peak, catches spikes between samples). `ru_maxrss` also counts the child's life as a fork of
  the benchmark before exec, so the benchmark process never imports torch (its ~20 MB is the floor).
  MB = 10**6 bytes, GB = 10**9 bytes.
- Page cache: the models fit in RAM, so after one warm-up round every contender reads from the page cache.
  Contenders are interleaved within each repetition, the order rotated by one from each repetition to the
  next, so they all see the same cache state and the same background noise, and none always follows the same
  neighbour (a run after `cp -r`, whose freed page cache the VM hands back to the host, faults its memory in
  slowly: our LoRA, always run right after `cp -r` and `import torch`, was up to 1.8 s slower than our DoRA);
  figures are medians over `--runs` repetitions and the ratios are computed from medians of the same run.
- The floor is what no merge in Python can skip: starting Python with torch (imported as the engine imports
  it, with the garbage collector kept off torch's objects, which saves a plain import ~0.45 s of collections),
  and hashing every output byte for the manifest (`hashlib.sha256` over reads from the page cache, whatever the
  read size from 256 KiB to 8 MiB: 1.37-1.41 GB/s on one core of the Intel Xeon host, 1.8-2.1 GB/s on the AMD
  EPYC one; the reference machine has come up on both).
  `python -c 'import torch'` alone is measured too, to show how much of it start-up is.
- Our CLI remembers input checksums between runs (keyed by file identity), so after the warm-up it hashes
  only its outputs, as it would on a service merging many adapters into one base.
- Before every run (untimed) all input files are read once with `cat`, so every contender starts with its
  inputs in the page cache even if the machine evicted them in between.
- Outputs go to a fresh folder each run and are deleted afterwards, followed by `sync` (not timed) so one
  run's write-back does not slow down the next.
- Writes on the reference VM: memory freed in the guest is reported back to the host (virtio-balloon free
  page reporting, a couple of seconds after it is freed), so the page cache grows into memory the host must
  back afresh, at ~0.35-0.6 GB/s of kernel CPU time (`dd` of 2.1-2.2 GB: ~6 s on the Intel host, 3.6 s on
  the AMD one, against ~0.5 s into pages freed just before, and 0.75-2 s with O_DIRECT). `cp -r` writes
  through the page cache and pays this whenever the last run's pages have been reported; our merge writes its
  shards with O_DIRECT and does not.

Other benchmarks' rows (`make bench-8b`'s `docs/benchmarks-8b.json`, `make bench-service`'s
`docs/service-benchmarks.json`, `make bench-overlap`'s `docs/bench-overlap.json`) join the page when it is
written or rebuilt (`--render`): each such file is a JSON object whose "rows" is a list of {"model",
"operation", "median_s", "min_s", "peak_rss_mb", "ratio_to", "note"}: seconds (a difference of times may be
negative), MB = 10**6 bytes or null, `ratio_to` an optional object of reference name -> this row's median over
the reference's (e.g. {"cp": 1.2, "ours": 3.1}), `note` a string (may be empty). Other keys (the file's
"machine", a row's "runs") are kept but not shown.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psutil

from tools.shapes import PRESETS, LlamaShape

REPO = Path(__file__).resolve().parent.parent
MB = 10**6
GB = 10**9
SAMPLE_SECONDS = 0.02
LORA_RANK, LORA_ALPHA = 16, 32
LINEARITY_TOLERANCE = 0.15
INPUT_FOLDERS = ("base", "lora", "dora")
RSS_LIMIT_GB = 0.5
FLOOR_LIMIT = 1.3
"""Our 1.1B LoRA merge's time over the floor's (issue #12)."""
DORA_LIMIT = 1.1
"""Our DoRA merge's time over our LoRA merge's."""
RSS_LIMITS_GB = {"1.1B": RSS_LIMIT_GB, "3B": RSS_LIMIT_GB}
CHART_COLORS = {"cp": "#9e9e9e", "disk": "#9e9e9e", "startup": "#9e9e9e", "floor": "#616161", "ours": "#1f77b4",
                "peft": "#ff7f0e"}
EXTRA_RESULTS = {"benchmarks-8b.json": "8B class (`make bench-8b`)",
                 "service-benchmarks.json": "Service on top of the engine (`make bench-service`)",
                 "bench-overlap.json": "Fetch and merge overlap (`make bench-overlap`)",
                 "bench-overlap-link.json": "Fetch and merge overlap over a throttled link (`make bench-overlap-link`)"}
"""Other benchmarks' raw rows in the docs folder (see the module docstring), and their sections' titles."""


@dataclass(frozen=True)
class BenchModel:
    """A generated base model and its two adapters, cached under `--data-dir/<slug>`."""

    label: str
    preset: str
    """Name in `tools.shapes.PRESETS`; also the cache folder's name."""
    base_flags: tuple[str, ...] = ()
    """Extra `tools.synthetic base` options, e.g. `--tiled` for a base too big to fill with randn quickly."""

    @property
    def slug(self) -> str:
        return self.preset

    @property
    def shape(self) -> LlamaShape:
        return PRESETS[self.preset]

    def folder(self, data_dir: Path) -> Path:
        return data_dir / self.slug


MODEL_1B = BenchModel("1.1B", "tinyllama-1.1b")
MODEL_3B = BenchModel("3B", "llama-3b")


@dataclass(frozen=True)
class Contender:
    """One measured operation on one model: a command that writes into `out`."""

    key: str
    """Stable id, e.g. 'ours-lora'; results and targets refer to it."""
    label: str
    argv: tuple[str, ...]
    out: Path


@dataclass
class Measurement:
    wall_s: float
    peak_rss: int


@dataclass
class Result:
    model: str
    key: str
    label: str
    runs: list[Measurement] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(m.wall_s for m in self.runs)

    @property
    def min_s(self) -> float:
        return min(m.wall_s for m in self.runs)

    @property
    def peak_rss(self) -> int:
        """The worst run: a memory limit has to hold every time, not on average."""
        return max(m.peak_rss for m in self.runs)


@dataclass
class Target:
    name: str
    measured: str
    limit: str
    ok: bool


def ensure_models(model: BenchModel, data_dir: Path) -> Path:
    """Generate base + LoRA + DoRA adapters unless a complete set with the same parameters is cached."""
    folder = model.folder(data_dir)
    stamp = folder / "complete.json"
    wanted = {"shape": asdict(model.shape), "dtype": "bfloat16", "r": LORA_RANK, "alpha": LORA_ALPHA}
    if model.base_flags:  # only then, so that caches stamped before the option existed stay valid
        wanted["base_flags"] = list(model.base_flags)
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    print(f"generating the {model.label} model and adapters in {folder} (cached for later runs) ...", flush=True)
    # In a child process: this process must not import torch (see `measure`).
    synthetic = [sys.executable, "-m", "tools.synthetic"]
    base = str(folder / "base")
    subprocess.run([*synthetic, "base", base, "--preset", model.preset, "--dtype", "bfloat16", *model.base_flags],
                   cwd=REPO, check=True)
    for name, flags in (("lora", []), ("dora", ["--dora"])):
        subprocess.run([*synthetic, "adapter", base, str(folder / name), "-r", str(LORA_RANK),
                        "--alpha", str(LORA_ALPHA), *flags], cwd=REPO, check=True)
    stamp.write_text(json.dumps(wanted, indent=2) + "\n")
    return folder


def model_bytes(base: Path) -> int:
    """Tensor bytes, from the index's `total_size` (the same number for any shard layout)."""
    return json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"]


def contenders(model: BenchModel, data_dir: Path, with_peft: bool, with_floor: bool = False) -> list[Contender]:
    folder = model.folder(data_dir)
    base = str(folder / "base")
    shards = sorted(str(p) for p in (folder / "base").glob("*.safetensors"))
    out_root = data_dir / "out"
    py = sys.executable

    def out(key: str) -> Path:
        return out_root / f"{model.slug}-{key}"

    items = [Contender("floor", "floor: import torch + sha256 of the bytes", (py, "-m", "tools.hash_floor", *shards),
                       out("floor")),
             # What the disk takes to absorb the bytes as our merge writes them (O_DIRECT); the floor writes nothing.
             Contender("disk", "dd oflag=direct of the bytes (reference)", direct_copy(shards, out("disk")),
                       out("disk"))] if with_floor else []
    items += [Contender("cp", "cp -r (reference)", ("cp", "-r", base, str(out("cp"))), out("cp")),
              # Every Python merge pays it: how much of the floor is start-up.
              Contender("startup", "python -c 'import torch'", (py, "-c", "import torch"), out("startup"))]
    for kind in ("lora", "dora"):
        argv = (py, "-m", "adapter_merge.cli", "merge", base, str(folder / kind), "--out", str(out(f"ours-{kind}")),
                "--quiet")
        items.append(Contender(f"ours-{kind}", f"ours {kind_label(kind)}", argv, out(f"ours-{kind}")))
    if with_peft:
        for kind in ("lora", "dora"):
            argv = (py, "-m", "tools.peft_merge", base, str(folder / kind), str(out(f"peft-{kind}")))
            items.append(Contender(f"peft-{kind}", f"PEFT {kind_label(kind)}", argv, out(f"peft-{kind}")))
    return items


def direct_copy(files: list[str], folder: Path) -> tuple[str, ...]:
    """A command that copies `files` into `folder` with `dd bs=8M oflag=direct`: our shard writer's block size and
    flag, from the page cache, with nothing to compute or hash (GNU dd writes an unaligned tail without the flag)."""
    script = 'mkdir -p "$0" && for f in "$@"; do dd if="$f" of="$0/${f##*/}" bs=8M oflag=direct status=none; done'
    return ("sh", "-c", script, str(folder), *files)


def kind_label(kind: str) -> str:
    return {"lora": "LoRA", "dora": "DoRA"}[kind]


def _tree_rss(proc: psutil.Process) -> int:
    """RSS of a process and all its descendants; processes that exit mid-walk count as 0."""
    total = 0
    try:
        family = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in family:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def measure(argv: Sequence[str], log: Path) -> Measurement:
    """Run one command to completion; wall time and whole-tree peak RSS. Raises if it fails.

    A child's `ru_maxrss` includes the memory it had as a fork of this process before exec, so this process
    stays small (no torch): its own RSS is the floor under every measured peak.
    """
    if "torch" in sys.modules:
        raise RuntimeError("the benchmark process imported torch; every ru_maxrss would include it")
    with log.open("wb") as sink:
        start = time.perf_counter()
        child = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink)
        proc = psutil.Process(child.pid)
        sampled = 0
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            sampled = max(sampled, _tree_rss(proc))
            time.sleep(SAMPLE_SECONDS)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; keeps Popen from waiting again
    if child.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(argv)} exited with {child.returncode}; log {log}:\n{tail}")
    return Measurement(wall, max(sampled, usage.ru_maxrss * 1024))  # ru_maxrss is in KiB on Linux


def _clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def prewarm(folder: Path) -> None:
    """Read every input file (untimed) so each run starts with the inputs in the page cache.

    The machine may evict page cache between runs (on the VM this was written on, a 2 GB base read after the
    full benchmark came from disk again); re-reading before every run gives all contenders the same state.
    `cat` rather than Python so this process's RSS, the floor under every ru_maxrss, stays small.
    """
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.parent.name in INPUT_FOLDERS)
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)


def run_contender(c: Contender, log_dir: Path) -> Measurement:
    _clean(c.out)
    c.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return measure(c.argv, log_dir / f"{c.out.name}.log")
    finally:
        _clean(c.out)


def bench_model(model: BenchModel, items: list[Contender], runs: int, data_dir: Path) -> list[Result]:
    """One warm-up round, then `runs` interleaved rounds of every contender, each round's order rotated."""
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results = [Result(model.label, c.key, c.label) for c in items]
    for rnd in range(runs + 1):
        what = "warm-up" if rnd == 0 else f"run {rnd}/{runs}"
        turn = rnd % len(items)
        for c, result in zip(items[turn:] + items[:turn], results[turn:] + results[:turn], strict=True):
            print(f"  {model.label} {what}: {c.label} ...", end=" ", flush=True)
            prewarm(model.folder(data_dir))
            m = run_contender(c, log_dir)
            print(f"{m.wall_s:.2f} s, {m.peak_rss / MB:.0f} MB", flush=True)
            if rnd:
                result.runs.append(m)
    return results


def find(results: list[Result], model: str, key: str) -> Result | None:
    return next((r for r in results if r.model == model and r.key == key), None)


def evaluate(results: list[Result], bytes_by_model: dict[str, int]) -> tuple[list[Target], list[str]]:
    """The issue's targets (PASS/MISS) and informative comparisons, all from medians of this run."""
    targets: list[Target] = []
    notes: list[str] = []

    def get(model: str, key: str) -> Result | None:
        return find(results, model, key)

    floor, lora, dora = get("1.1B", "floor"), get("1.1B", "ours-lora"), get("1.1B", "ours-dora")
    if floor and lora:
        x = lora.median_s / floor.median_s
        targets.append(Target("LoRA merge time vs the floor (import torch + sha256 of the bytes, 1.1B)",
                              f"{x:.2f}x", f"<= {FLOOR_LIMIT}x", x <= FLOOR_LIMIT))
    if lora and dora:
        x = dora.median_s / lora.median_s
        targets.append(Target("DoRA merge time vs our LoRA merge (1.1B)", f"{x:.2f}x", f"<= {DORA_LIMIT}x",
                              x <= DORA_LIMIT))
    for model, limit in RSS_LIMITS_GB.items():
        for key in ("ours-lora", "ours-dora"):
            r = get(model, key)
            if r:
                gb = r.peak_rss / GB
                targets.append(Target(f"peak RSS, {r.label} ({model})", f"{gb:.2f} GB", f"<= {limit} GB",
                                      gb <= limit))
    if "3B" in bytes_by_model and "1.1B" in bytes_by_model:
        byte_ratio = bytes_by_model["3B"] / bytes_by_model["1.1B"]
        # Start-up (importing torch, the same for any size) is taken off both: it is a third of the 1.1B merge.
        start_small, start_big = get("1.1B", "startup"), get("3B", "startup")
        for key in ("ours-lora", "ours-dora"):
            small, big = get("1.1B", key), get("3B", key)
            if small and big and start_small and start_big:
                time_ratio = (big.median_s - start_big.median_s) / (small.median_s - start_small.median_s)
                dev = time_ratio / byte_ratio - 1
                targets.append(Target(
                    f"time after start-up linear in bytes, {small.label} (3B/1.1B)",
                    f"time {time_ratio:.3f}x vs bytes {byte_ratio:.3f}x ({dev:+.1%})",
                    f"within {LINEARITY_TOLERANCE:.0%}", abs(dev) <= LINEARITY_TOLERANCE))
        cp_small, cp_big = get("1.1B", "cp"), get("3B", "cp")
        if cp_small and cp_big:
            notes.append(f"cp -r 3B/1.1B time: {cp_big.median_s / cp_small.median_s:.2f}x for "
                         f"{byte_ratio:.2f}x the bytes (how linear the machine's own I/O is)")
    disk = get("1.1B", "disk")
    if disk and floor and lora:
        notes.append(f"the disk: writing the same bytes with O_DIRECT alone (dd) took {disk.median_s:.2f} s, "
                     f"{disk.median_s / floor.median_s:.2f}x the floor; our LoRA merge is "
                     f"{lora.median_s / max(floor.median_s, disk.median_s):.2f}x the larger of the two")
    startup = get("1.1B", "startup")
    if floor and startup:
        notes.append(f"start-up (python -c 'import torch') is {startup.median_s / floor.median_s:.0%} of the floor's "
                     "time; the rest is hashing")
    peft_lora, peft_dora = get("1.1B", "peft-lora"), get("1.1B", "peft-dora")
    if peft_lora and peft_dora:
        notes.append(f"PEFT DoRA / PEFT LoRA time: {peft_dora.median_s / peft_lora.median_s:.2f}x")
    for ours, peft in ((lora, peft_lora), (dora, peft_dora)):
        if ours and peft:
            notes.append(f"{peft.label} vs {ours.label}: {peft.median_s / ours.median_s:.1f}x the time, "
                         f"{peft.peak_rss / ours.peak_rss:.1f}x the peak RSS")
    return targets, notes


def table_rows(results: list[Result]) -> list[list[str]]:
    header = ["model", "operation", "median s", "min s", "peak RSS MB", "x floor", "x cp -r"]
    rows = [header]
    for r in results:
        ratios = [f"{r.median_s / ref.median_s:.2f}" if (ref := find(results, r.model, key)) else "-"
                  for key in ("floor", "cp")]
        rows.append([r.model, r.label, f"{r.median_s:.2f}", f"{r.min_s:.2f}", f"{r.peak_rss / MB:.0f}", *ratios])
    return rows


def target_rows(targets: list[Target]) -> list[list[str]]:
    return [["target", "measured", "limit", "result"]] + [
        [t.name, t.measured, t.limit, "PASS" if t.ok else "MISS"] for t in targets]


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("---" for _ in rows[0]) + "|")
    return "\n".join(lines)


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or "unknown",
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "ram": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": pkg("torch"),
        "transformers": pkg("transformers"),
        "peft": pkg("peft"),
        "safetensors": pkg("safetensors"),
    }


def write_chart(results: list[Result], extras: dict[str, dict[str, Any]], path: Path) -> None:
    """Time and peak-RSS bars from the same numbers as the tables: this run's, then each other benchmark's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    groups = [(f"median of {len(results[0].runs)} runs", [
        {"model": r.model, "operation": r.label, "key": r.key, "median_s": r.median_s,
         "peak_rss_mb": r.peak_rss / MB} for r in results])]
    groups += [(title, found["rows"]) for title, found in extras.items() if found["rows"]]
    heights = [0.55 * len(rows) + 1.2 for _, rows in groups]
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for (title, rows), (ax_t, ax_m) in zip(groups, axes, strict=True):
        labels = [f"{row['operation'].removesuffix(' (reference)')}\n{row['model']}" for row in rows]
        colors = [CHART_COLORS.get(str(row.get("key", "ours")).split("-")[0], CHART_COLORS["ours"]) for row in rows]
        hatches = ["//" if row["model"] == "3B" else "" for row in rows]
        for ax, values, unit in ((ax_t, [row["median_s"] for row in rows], "s"),
                                 (ax_m, [row["peak_rss_mb"] or 0 for row in rows], "MB")):
            bars = ax.barh(range(len(rows)), values, color=colors, hatch=hatches, edgecolor="white")
            shown = [f"{v:.2f} s" if unit == "s" else (f"{v:.0f} MB" if v else "-") for v in values]
            ax.bar_label(bars, labels=shown, padding=3, fontsize=8)
            ax.set_yticks(range(len(rows)), labels, fontsize=8)
            ax.invert_yaxis()
            ax.margins(x=0.18)
        ax_t.set_title(f"wall time: {title}", fontsize=9)
        ax_m.set_title("peak RSS (whole process tree, worst run)", fontsize=9)
        for model, limit_gb in RSS_LIMITS_GB.items():
            indices = [i for i, row in enumerate(rows) if row["model"] == model and row["peak_rss_mb"]]
            if indices:  # the limit line spans only that model's bars
                x = limit_gb * GB / MB
                ax_m.vlines(x, indices[0] - 0.45, indices[-1] + 0.45, color="#d62728", linestyle="--", linewidth=1)
                ax_m.text(x, indices[0] - 0.45, f" target {model}", color="#d62728", fontsize=7, va="top")
    axes[0][0].legend(handles=[Patch(color=c, label=n) for n, c in (("reference", CHART_COLORS["cp"]),
                                                                     ("ours", CHART_COLORS["ours"]),
                                                                     ("PEFT", CHART_COLORS["peft"]))],
                      fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def extra_results(docs: Path) -> dict[str, dict[str, Any]]:
    """Other benchmarks' results found in `docs` (see the module docstring: "rows", "machine"), by section title."""
    return {title: json.loads((docs / name).read_text()) for name, title in EXTRA_RESULTS.items()
            if (docs / name).is_file()}


def measured_when(found: dict[str, Any]) -> str:
    """When and at which commit a section's own bench ran: the host of a shared machine can be twice as fast one
    hour as the next, so a section measured at another time is only comparable within itself."""
    machine = found.get("machine") or {}
    return f"Measured {machine.get('date', 'at an unrecorded time')}, commit {machine.get('commit', 'unrecorded')}."


def extra_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    table = [["model", "operation", "median s", "min s", "peak RSS MB", "ratios", "note"]]
    for row in rows:
        ratios = ", ".join(f"{x:.2f}x {name}" for name, x in (row.get("ratio_to") or {}).items()) or "-"
        rss = "-" if row.get("peak_rss_mb") is None else f"{row['peak_rss_mb']:.0f}"
        table.append([row["model"], row["operation"], f"{row['median_s']:.3f}", f"{row['min_s']:.3f}", rss, ratios,
                      row.get("note") or ""])
    return table


def headline_rows(results: list[Result], extras: dict[str, dict[str, Any]]) -> list[list[str]]:
    """The README's performance table: per model, ours and PEFT (time, peak RSS) and PEFT's time over ours."""
    rows = [{"model": r.model, "key": r.key, "median_s": r.median_s, "peak_rss_mb": r.peak_rss / MB,
             "note": ""} for r in results]
    rows += [row for title, found in extras.items() if title.startswith("8B") for row in found["rows"]
             if "key" in row]
    table = [["model", "merge", "ours: time, peak RSS", "PEFT: time, peak RSS", "PEFT time / ours"]]
    for model in dict.fromkeys(row["model"] for row in rows):
        for kind in ("lora", "dora"):
            ours, peft = (next((row for row in rows if row["model"] == model and row["key"] == f"{who}-{kind}"), None)
                          for who in ("ours", "peft"))
            if ours is None:
                continue
            ratio = f"{peft['median_s'] / ours['median_s']:.1f}x" if peft and not peft.get("note") else "-"
            table.append([model, kind_label(kind), _time_and_rss(ours), _time_and_rss(peft) if peft else "not run",
                          ratio])
    return table


def _time_and_rss(row: dict[str, Any]) -> str:
    shown = f"{row['median_s']:.1f} s, {row['peak_rss_mb'] / 1000:.2f} GB"
    return f"{shown} ({row['note']})" if row.get("note") else shown


def write_docs(results: list[Result], targets: list[Target], notes: list[str], info: dict[str, str],
               bytes_by_model: dict[str, int], runs: int, docs: Path) -> Path:
    docs.mkdir(parents=True, exist_ok=True)
    extras = extra_results(docs)
    chart = docs / "benchmarks.png"
    write_chart(results, extras, chart)
    sizes = ", ".join(f"{m} = {b / GB:.2f} GB" for m, b in bytes_by_model.items())
    method = (__doc__ or "").split("How it measures, and why:\n", 1)[1].strip()
    text = "\n".join([
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python -m tools.bench`); do not edit by hand. Every run's raw numbers: "
        "`benchmarks.json`.",
        "",
        "Models: generated Llama-shaped bf16 bases (`tools/synthetic.py`), sharded at 1 GB, untied: "
        "TinyLlama-1.1B dimensions (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads, "
        "vocab 32000) and a 3B shape (hidden 3072, intermediate 8192, 28 layers, 24 heads, 8 KV heads). "
        f"Tensor bytes: {sizes}. Adapters: r={LORA_RANK}, alpha={LORA_ALPHA} on all seven projections, "
        "one LoRA and one DoRA. PEFT is run on the 1.1B model only.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        f"## Results (median of {runs} runs)",
        "",
        markdown_table(table_rows(results)),
        "",
        "![time and peak RSS](benchmarks.png)",
        "",
        "## Targets",
        "",
        markdown_table(target_rows(targets)),
        "",
        *[f"- {n}" for n in notes],
        "",
        *[line for title, found in extras.items() for line in (
            f"## {title}", "", measured_when(found), "", markdown_table(extra_table(found["rows"])), "")],
        "## Headline (the README's Performance table)",
        "",
        markdown_table(headline_rows(results, extras)),
        "",
        "## Method",
        "",
        method,
        "",
    ])
    page = docs / "benchmarks.md"
    page.write_text(text)
    raw = {"machine": info, "runs": runs, "tensor_bytes": bytes_by_model,
           "results": [{"model": r.model, "operation": r.label, "key": r.key,
                        "runs": [asdict(m) for m in r.runs]} for r in results]}
    (docs / "benchmarks.json").write_text(json.dumps(raw, indent=2) + "\n")
    return page


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="measured repetitions per contender (default 3)")
    parser.add_argument("--quick", action="store_true", help="skip PEFT and the 3B model")
    parser.add_argument("--skip-peft", action="store_true", help="do not run the PEFT baseline")
    parser.add_argument("--skip-3b", action="store_true", help="do not run the 3B-shaped model")
    parser.add_argument("--data-dir", type=Path, default=REPO / "bench-data",
                        help="generated models, outputs and logs (default bench-data/, reused between runs)")
    parser.add_argument("--docs-dir", type=Path, default=REPO / "docs")
    parser.add_argument("--render", type=Path, metavar="JSON", nargs="?", const=REPO / "docs" / "benchmarks.json",
                        help="only rebuild the docs from a saved benchmarks.json (default docs/benchmarks.json) "
                             "and the other benchmarks' rows in the docs folder, measuring nothing")
    parser.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=None,
                        help="write docs/benchmarks.md + .png (default: only for a full run)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.quick:
        args.skip_peft = args.skip_3b = True
    if args.write_docs is None:
        args.write_docs = not (args.skip_peft or args.skip_3b)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        render(args.render, args.docs_dir)
        return 0
    data_dir = args.data_dir.resolve()
    # Our CLI's input-checksum cache: kept with the benchmark data, filled by the warm-up round.
    os.environ["ADAPTER_MERGE_CACHE"] = str(data_dir / "checksum-cache")
    models = [MODEL_1B] + ([] if args.skip_3b else [MODEL_3B])
    results: list[Result] = []
    bytes_by_model: dict[str, int] = {}
    for model in models:
        folder = ensure_models(model, data_dir)
        bytes_by_model[model.label] = model_bytes(folder / "base")
        items = contenders(model, data_dir, with_peft=not args.skip_peft and model is MODEL_1B,
                           with_floor=model is MODEL_1B)
        print(f"{model.label}: {bytes_by_model[model.label] / GB:.2f} GB of tensors, "
              f"{len(items)} contenders x ({args.runs} runs + 1 warm-up)", flush=True)
        results += bench_model(model, items, args.runs, data_dir)

    report(results, bytes_by_model, machine_info(), args.runs, args.docs_dir if args.write_docs else None)
    return 0


def report(results: list[Result], bytes_by_model: dict[str, int], info: dict[str, str], runs: int,
           docs_dir: Path | None) -> None:
    """Print the tables and, with a `docs_dir`, write the page, chart and raw numbers."""
    targets, notes = evaluate(results, bytes_by_model)
    print()
    print(text_table(table_rows(results)))
    print()
    print(text_table(target_rows(targets)))
    for note in notes:
        print(f"- {note}")
    if docs_dir is None:
        print("\n(partial run: docs/benchmarks.md not written; pass --write-docs to force)")
        return
    page = write_docs(results, targets, notes, info, bytes_by_model, runs, docs_dir)
    print(f"\nwrote {page}, {page.with_suffix('.png')} and {page.with_suffix('.json')}")


def render(raw_path: Path, docs_dir: Path) -> None:
    """Rebuild the page and chart from a saved `benchmarks.json` (after a formatting change), no measuring."""
    raw = json.loads(raw_path.read_text())
    results = [Result(r["model"], r["key"], r["operation"], [Measurement(**m) for m in r["runs"]])
               for r in raw["results"]]
    report(results, raw["tensor_bytes"], raw["machine"], raw["runs"], docs_dir)


if __name__ == "__main__":
    raise SystemExit(main())
