"""Real processes for the service tests: `adapter-merge serve` and `adapter-merge worker` subprocesses, each in
its own session so a test can SIGKILL a whole worker (main process and pool children) and teardown can
never leave strays behind; plus an HTTP client that knows the API's job lifecycle.

Nothing here sleeps for a fixed time: every wait polls a condition (a job's state, a line in a log) until a
deadline, so a test is as fast as the machine allows and fails with what it last saw.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from tests.loopback import wait_for

REPO = Path(__file__).resolve().parents[2]
FINISHED = ("succeeded", "failed", "cancelled")

# Short leases so recovery happens within a few seconds; heartbeat at most half the lease (a settings rule).
# A healthy worker renews every 0.5 s, so only a pause of more than 2.5 s would cost it its lease.
TEST_TIMINGS = {
    "MERGE_LEASE_SECONDS": "3",
    "MERGE_HEARTBEAT_SECONDS": "0.5",
    "MERGE_REAP_INTERVAL_SECONDS": "0.5",
    "MERGE_POLL_SECONDS": "0.2",
}


def service_env(data_dir: Path, models_root: Path, **overrides: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MERGE_")}
    env.update(TEST_TIMINGS)
    # Authentication off (loopback only) unless a test is about it and says otherwise.
    env.update(MERGE_DATA_DIR=str(data_dir), MERGE_MODEL_ROOTS=str(models_root), MERGE_LOG_LEVEL="info",
               MERGE_AUTH="none",
               PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)])),
               PYTHONUNBUFFERED="1")
    env.update(overrides)
    return env


def coverage_env() -> dict[str, str]:
    """When this test run measures coverage (`make test`), the servers and workers started here measure theirs
    with the same configuration: coverage's start-up hook in every Python process reads it from
    COVERAGE_PROCESS_CONFIG (what `[run] patch = subprocess` sets for all subprocesses; here only for these)."""
    try:
        import coverage
    except ImportError:
        return {}
    current = coverage.Coverage.current()
    return {} if current is None else {"COVERAGE_PROCESS_CONFIG": current.config.serialize()}


class Proc:
    """A CLI subprocess in its own process group, logging to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, pass_fds: tuple[int, ...] = ()) -> None:
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = log.open("ab")
        env = {**env, **coverage_env()}
        self.popen = subprocess.Popen([sys.executable, "-m", "adapter_merge.cli", *args], cwd=REPO, env=env,
                                      stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                      pass_fds=pass_fds)
        self.pid = self.popen.pid
        self._terminated = False

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self) -> str:
        return f"{self.log.name} ({'running' if self.alive() else f'exit {self.popen.returncode}'}):\n" \
               f"{self.log_text()[-3000:]}"

    def wait_for_log(self, needle: str, timeout: float) -> None:
        def logged() -> bool:
            if needle in self.log_text():
                return True
            if not self.alive():
                raise AssertionError(f"process exited before logging {needle!r}: {self.tail()}")
            return False

        wait_for(logged, timeout, lambda: f"{needle!r} logged by {self.tail()}")

    def group_pids(self) -> set[int]:
        """Every live process of this group (the worker and the processes it forked). Zombies do not count:
        they are dead, only not reaped yet (an orphan's by init, which may take seconds)."""
        import psutil

        pids = set()
        for process in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(process.pid) == self.pid and process.info["status"] != psutil.STATUS_ZOMBIE:
                    pids.add(process.pid)
            except (ProcessLookupError, PermissionError):
                continue
        return pids

    def kill_group(self) -> None:
        """SIGKILL the whole group: what a crashed node or OOM-killed container looks like."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(10)

    def terminate(self) -> None:
        """SIGTERM, once: a graceful stop (a Celery worker's second signal would be a cold shutdown)."""
        if self.alive() and not self._terminated:
            self._terminated = True
            self.popen.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM and wait; SIGKILL the group if it does not stop in time. Returns the exit code."""
        self.terminate()
        if self.alive():
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
        code = self.popen.returncode
        self.reap_group()
        return code

    def reap_group(self) -> None:
        """Make sure nothing of this group survives (e.g. children orphaned by a crash)."""
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not self.group_pids(), 10, "the process group to exit")
        if self.group_pids():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        self._log_file.close()


def torch_loaded(pid: int) -> bool:
    """The process has torch's library mapped: it imported torch."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False


def ready_merge_processes(proc: Proc) -> set[int]:
    """The live merge processes of `proc`'s tree (Celery pool processes, the embedded workers') that have loaded
    the engine: ready for a job, or running one since."""
    log = proc.log_text()
    return {pid for pid in proc.group_pids() if f"merge process {pid} ready" in log}


def stop_all(procs: Iterable[Proc]) -> list[int]:
    """Stop several processes at once (all are signalled before any is waited for); their exit codes."""
    procs = list(procs)
    for proc in procs:
        proc.terminate()
    return [proc.stop() for proc in procs]


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
        """Poll the job until `until` (a predicate, or the statuses to wait for) holds; returns it."""
        check = until if callable(until) else (lambda job, wanted=tuple(until): job["status"] in wanted)
        seen: list[dict[str, Any]] = []

        def reached() -> dict[str, Any] | None:
            job = self.job(job_id)
            seen[:] = [job]
            if on_poll is not None:
                on_poll(job)
            return job if check(job) else None

        return wait_for(reached, timeout, lambda: f"job {job_id} in the awaited state; last seen {seen}")

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


def launch_server(env: dict[str, str], log: Path) -> tuple[Proc, Api]:
    """Start `adapter-merge serve` on a socket bound and listening here, so the port cannot be taken in
    between and a request made before the server is up waits in the backlog instead of being refused."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        proc = Proc(["serve", "--fd", str(listener.fileno())], env, log, pass_fds=(listener.fileno(),))
    return proc, Api(f"http://127.0.0.1:{port}")


def wait_healthy(proc: Proc, api: Api, timeout: float = 30.0) -> None:
    def healthy() -> bool:
        if not proc.alive():
            raise AssertionError(f"server exited: {proc.tail()}")
        try:
            return api.http.get("/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, timeout, lambda: f"server health: {proc.tail()}")


def start_server(env: dict[str, str], log: Path) -> tuple[Proc, Api]:
    proc, api = launch_server(env, log)
    wait_healthy(proc, api)
    return proc, api


@contextlib.contextmanager
def serving(env: dict[str, str], log: Path) -> Iterator[tuple[Proc, Api]]:
    """A started server for the block, stopped after it however the block ends; a server that does not exit
    cleanly then fails the test with the end of its log (a crash at shutdown is a bug too)."""
    proc, api = start_server(env, log)
    try:
        yield proc, api
    finally:
        api.close()
        assert proc.stop() == 0, proc.tail()


def launch_worker(env: dict[str, str], log: Path) -> Proc:
    return Proc(["worker"], env, log)


def wait_worker_ready(proc: Proc) -> None:
    proc.wait_for_log(" ready.", 60)


def start_worker(env: dict[str, str], log: Path) -> Proc:
    proc = launch_worker(env, log)
    wait_worker_ready(proc)
    return proc


@contextlib.contextmanager
def running_cluster(log_dir: Path, server_env: dict[str, str],
                    worker_envs: Sequence[dict[str, str]]) -> Iterator[tuple[Proc, Api, list[Proc]]]:
    """A server and Celery workers, all started at once and each waited for; all stopped afterwards (a worker a
    test removes from the list, e.g. after killing it, is its own business)."""
    server, api = launch_server(server_env, log_dir / "server.log")
    workers = [launch_worker(env, log_dir / f"worker-{index}.log") for index, env in enumerate(worker_envs)]
    try:
        wait_healthy(server, api)
        for worker in workers:
            wait_worker_ready(worker)
        yield server, api, workers
    finally:
        api.close()
        stop_all([server, *workers])
