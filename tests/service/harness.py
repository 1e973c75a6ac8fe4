"""Real processes for the service tests: `adapter-merge serve` and `adapter-merge worker` subprocesses, each in
its own session so a test can SIGKILL a whole worker (main process and pool children) and teardown can
never leave strays behind; plus an HTTP client that knows the API's job lifecycle.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
FINISHED = ("succeeded", "failed", "cancelled")

# Short leases so recovery happens within seconds; heartbeat at most half the lease (a settings rule).
TEST_TIMINGS = {
    "MERGE_LEASE_SECONDS": "6",
    "MERGE_HEARTBEAT_SECONDS": "1",
    "MERGE_REAP_INTERVAL_SECONDS": "1",
    "MERGE_POLL_SECONDS": "0.2",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def service_env(data_dir: Path, models_root: Path, **overrides: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MERGE_")}
    env.update(TEST_TIMINGS)
    env.update(MERGE_DATA_DIR=str(data_dir), MERGE_MODEL_ROOTS=str(models_root), MERGE_LOG_LEVEL="info",
               PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.update(overrides)
    return env


class Proc:
    """A CLI subprocess in its own process group, logging to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = log.open("ab")
        self.popen = subprocess.Popen([sys.executable, "-m", "adapter_merge.cli", *args], cwd=REPO, env=env,
                                      stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for_log(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log_text():
            if not self.alive():
                raise AssertionError(f"process exited ({self.popen.returncode}):\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not logged in {timeout} s:\n{self.log_text()[-3000:]}")
            time.sleep(0.1)

    def group_pids(self) -> set[int]:
        """Every live process of this group (the worker and the processes it forked)."""
        import psutil

        pids = set()
        for process in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(process.pid) == self.pid:
                    pids.add(process.pid)
            except (ProcessLookupError, PermissionError):
                continue
        return pids

    def kill_group(self) -> None:
        """SIGKILL the whole group: what a crashed node or OOM-killed container looks like."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM and wait; SIGKILL the group if it does not stop in time. Returns the exit code."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
        code = self.popen.returncode
        self.reap_group()
        return code

    def reap_group(self) -> None:
        """Make sure nothing of this group survives (e.g. children orphaned by a crash)."""
        deadline = time.monotonic() + 10
        while self.group_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.group_pids():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        self._log_file.close()


class Api:
    """HTTP client for one running server."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, timeout=60)

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post("/merge", json=body)
        assert response.status_code == 202, response.text
        assert response.headers["location"] == f"/jobs/{response.json()['id']}"
        return response.json()

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, job_id: str, until: Callable[[dict[str, Any]], bool] | Iterable[str] = FINISHED,
             timeout: float = 120.0, on_poll: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        check = until if callable(until) else (lambda job, wanted=tuple(until): job["status"] in wanted)
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_poll is not None:
                on_poll(job)
            if check(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not there in {timeout} s: {job}")
            time.sleep(0.1)

    def download(self, url: str, dest: Path | None = None) -> tuple[str, int, httpx.Headers]:
        """Stream a download; returns (sha256, byte count, headers) and writes `dest` if given."""
        digest, count = hashlib.sha256(), 0
        with self.http.stream("GET", url) as response:
            assert response.status_code == 200, response.read()
            handle = dest.open("wb") if dest is not None else None
            try:
                for chunk in response.iter_bytes(1 << 20):
                    digest.update(chunk)
                    count += len(chunk)
                    if handle is not None:
                        handle.write(chunk)
            finally:
                if handle is not None:
                    handle.close()
            return digest.hexdigest(), count, response.headers

    def download_all(self, job: dict[str, Any], dest: Path | None = None) -> dict[str, str]:
        """Every artifact, each checked against its advertised size, sha256 and ETag; path -> sha256."""
        assert job["artifacts"], job
        digests = {}
        for artifact in job["artifacts"]:
            target = None
            if dest is not None:
                target = dest / artifact["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
            sha, size, headers = self.download(artifact["url"], target)
            assert (sha, size) == (artifact["sha256"], artifact["size"]), artifact["path"]
            assert headers["etag"] == f'"{sha}"'
            assert int(headers["content-length"]) == size
            digests[artifact["path"]] = sha
        return digests

    def close(self) -> None:
        self.http.close()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until `condition()`; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)
    return time.monotonic() - started


def start_server(env: dict[str, str], log: Path, port: int | None = None) -> tuple[Proc, Api]:
    port = port or free_port()
    proc = Proc(["serve", "--host", "127.0.0.1", "--port", str(port)], env, log)
    api = Api(f"http://127.0.0.1:{port}")

    def healthy() -> bool:
        if not proc.alive():
            raise AssertionError(f"server exited:\n{proc.log_text()[-3000:]}")
        try:
            return api.http.get("/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, 30, "server health")
    return proc, api


def start_worker(env: dict[str, str], log: Path) -> Proc:
    proc = Proc(["worker"], env, log)
    proc.wait_for_log(" ready.", 60)
    return proc
