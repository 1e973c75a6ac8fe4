"""`make demo`: the embedded service end to end on a locally generated model, over real HTTP.

Generates a small Llama-shaped base model and two adapters (LoRA and DoRA) with tools.synthetic, starts
`adapter-merge serve` on a free port (embedded mode, data under demo-data/), submits a merge, shows its
progress, downloads every artifact, checks sizes, sha256 and the safetensors headers, prints the timings and
stops the server. Exit status 0 only if every check passed.

Each run starts the service afresh (its job store and results, demo-data/service, are removed first; the
generated models are kept): with the previous run's store the identical request would be answered with the
earlier job's result, merging nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "demo-data"
FINISHED = ("succeeded", "failed", "cancelled")


def generate_models(root: Path, preset: str) -> dict[str, Any]:
    """Base + LoRA + DoRA under the model root, made once; returns the merge request for them."""
    from tools.synthetic import PRESETS, write_llama_base, write_lora_adapter

    folder = root / preset
    if not (folder / "dora" / "adapter_config.json").is_file():
        print(f"generating the {preset!r} model and adapters in {folder.relative_to(REPO)} ...")
        base = write_llama_base(folder / "base", **PRESETS[preset])
        write_lora_adapter(base, folder / "lora", r=16, alpha=32)
        write_lora_adapter(base, folder / "dora", r=8, alpha=16, dora=True, seed=2)
    return {"base_model": f"{preset}/base", "adapters": [f"{preset}/lora", {"ref": f"{preset}/dora", "weight": 0.5}]}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MERGE_")}
    # A demo on loopback: authentication off (the server then refuses to listen anywhere else).
    env.update(MERGE_DATA_DIR=str(DATA / "service"), MERGE_MODEL_ROOTS=str(DATA / "models"),
               MERGE_LOG_LEVEL="warning", MERGE_AUTH="none", PYTHONPATH=str(REPO))
    with log.open("wb") as handle:
        return subprocess.Popen([sys.executable, "-m", "adapter_merge.cli", "serve", "--port", str(port)], cwd=REPO,
                                env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def wait_ready(client: httpx.Client, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}):\n{log.read_text()[-2000:]}")
        try:
            if client.get("/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become ready in 60 s")


def show_progress(job: dict[str, Any], last: list[str]) -> None:
    progress = job["progress"]
    fraction = progress["bytes_done"] / progress["bytes_total"] if progress["bytes_total"] else 0.0
    bar = "#" * int(fraction * 30)
    line = (f"  [{bar:.<30}] {fraction:6.1%}  {progress['tensors_done']}/{progress['tensors_total']} tensors"
            f"  {job['status']}")
    if sys.stdout.isatty():
        print(f"\r{line}", end="", flush=True)
    elif line != (last[0] if last else None):
        print(line, flush=True)
    last[:] = [line]


def follow(client: httpx.Client, job_id: str) -> dict[str, Any]:
    last: list[str] = []
    while True:
        job = client.get(f"/jobs/{job_id}").raise_for_status().json()
        show_progress(job, last)
        if job["status"] in FINISHED:
            if sys.stdout.isatty():
                print()
            return job
        time.sleep(0.1)


def download_and_check(client: httpx.Client, job: dict[str, Any], dest: Path) -> list[str]:
    """Every artifact to `dest`, checked against its advertised size and sha256; returns problems found."""
    problems = []
    dest.mkdir(parents=True, exist_ok=True)
    for artifact in job["artifacts"]:
        digest, size = hashlib.sha256(), 0
        target = dest / artifact["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        with client.stream("GET", artifact["url"]) as response, target.open("wb") as handle:
            response.raise_for_status()
            for chunk in response.iter_bytes(1 << 20):
                digest.update(chunk)
                size += len(chunk)
                handle.write(chunk)
        ok = digest.hexdigest() == artifact["sha256"] and size == artifact["size"]
        if response.headers.get("etag") != f'"{artifact["sha256"]}"':
            ok = False
        print(f"  {'ok ' if ok else 'BAD'} {artifact['path']:<40} {size:>12,} B  sha256 {digest.hexdigest()[:16]}…")
        if not ok:
            problems.append(f"{artifact['path']}: size/sha256/ETag do not match what the job reported")
    return problems + check_tensors(dest, job["progress"]["tensors_total"])


def check_tensors(folder: Path, expected: int) -> list[str]:
    """The downloaded shards are readable safetensors holding every tensor the job reported."""
    from safetensors import safe_open

    count = 0
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            count += len(list(handle.keys()))
    print(f"  {count} tensors in {len(list(folder.glob('*.safetensors')))} safetensors file(s)")
    return [] if count == expected else [f"found {count} tensors, the job reported {expected}"]


def print_report(job: dict[str, Any]) -> None:
    timings, metrics = job["timings"], job["metrics"]
    phases = "  ".join(f"{phase} {'-' if timings[phase] is None else f'{timings[phase]:.2f}'}"
                       for phase in ("queued", "resolve", "merge", "write", "total"))
    print(f"timings (s): {phases}")
    print(f"metrics: peak RSS {metrics['peak_rss_bytes'] / 2**20:.0f} MiB, "
          f"{metrics['bytes_per_second'] / 1e6:.1f} MB/s written, {metrics['bytes_written']:,} bytes, "
          f"{metrics['tensors_merged']} tensors merged + {metrics['tensors_copied']} copied, "
          f"worker {job['worker']}")


def main(argv: Sequence[str] | None = None) -> int:
    from tools.synthetic import PRESETS

    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="model size (default demo)")
    parser.add_argument("--port", type=int, default=None, help="server port (default: a free one)")
    args = parser.parse_args(argv)

    DATA.mkdir(exist_ok=True)
    shutil.rmtree(DATA / "service", ignore_errors=True)
    request = generate_models(DATA / "models", args.preset)
    port = args.port or free_port()
    log = DATA / "server.log"
    print(f"starting `adapter-merge serve` on http://127.0.0.1:{port} (embedded mode, log in {log.relative_to(REPO)})")
    server = start_server(port, log)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        wait_ready(client, server, log)
        response = client.post("/merge", json=request)
        if response.status_code != 202:
            print(f"POST /merge answered {response.status_code}: {response.text}", file=sys.stderr)
            return 1
        job = response.json()
        print(f"POST /merge -> 202, job {job['id']} ({job['progress']['tensors_total']} tensors, "
              f"{job['progress']['bytes_total']:,} bytes)")
        job = follow(client, job["id"])
        if job["status"] != "succeeded":
            print(f"job {job['status']}: {job['error']}", file=sys.stderr)
            return 1
        dest = DATA / "downloads" / job["id"]
        print(f"downloading {len(job['artifacts'])} artifacts to {dest.relative_to(REPO)}:")
        problems = download_and_check(client, job, dest)
        print_report(job)
        for problem in problems:
            print(f"check failed: {problem}", file=sys.stderr)
        print("all checks passed" if not problems else "CHECKS FAILED")
        return 1 if problems else 0
    finally:
        client.close()
        stop_server(server)
        print(f"server stopped (exit {server.returncode})")


if __name__ == "__main__":
    raise SystemExit(main())
