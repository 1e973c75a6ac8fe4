"""`adapter-merge serve`: uvicorn serving the API and, in embedded mode, the local worker processes.

The workers start once the API is listening and are restarted if they die. At shutdown (SIGTERM/SIGINT)
the API stops taking requests, then each worker stops its merge at the next tensor and puts the job back in
the queue, so the next `serve` resumes it. The worker processes never share the API's interpreter: torch is
only ever imported by them.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from types import FrameType

import uvicorn

from adapter_merge.core.process import start_process
from adapter_merge.core.settings import Settings
from adapter_merge.service.app import create_app
from adapter_merge.service.limits import HeaderTimeoutProtocol

log = logging.getLogger("adapter_merge.cli.serve")
WORKER_STOP_SECONDS = 30.0
RESTART_BACKOFF_MAX_SECONDS = 30.0
EMBEDDED_WORKER_MODULE = "adapter_merge.worker.embedded"


class WorkerSupervisor:
    """Keeps `count` embedded worker processes running until `stop()`."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.processes: list[subprocess.Popen[bytes]] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def _spawn(self) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", EMBEDDED_WORKER_MODULE, "--parent-pid", str(os.getpid())]
        process = subprocess.Popen(command)
        log.info("embedded worker started (pid %d)", process.pid)
        return process

    def start(self) -> None:
        self.processes = [self._spawn() for _ in range(self.count)]
        self._thread.start()

    def _watch(self) -> None:
        backoff = 1.0
        while not self._stopping.wait(1.0):
            for index, process in enumerate(self.processes):
                if process.poll() is None or self._stopping.is_set():
                    continue
                log.error("embedded worker %d exited with %s; restarting in %.0f s", process.pid,
                          process.returncode, backoff)
                if self._stopping.wait(backoff):
                    return
                self.processes[index] = self._spawn()
                backoff = min(backoff * 2, RESTART_BACKOFF_MAX_SECONDS)

    def problem(self) -> str | None:
        """For readiness: a worker process that is not running (it died; the watch restarts it)."""
        if not self.processes:
            return "the local worker processes have not started yet"
        dead = [process.pid for process in self.processes if process.poll() is not None]
        return f"local worker process {', '.join(map(str, dead))} exited; restarting it" if dead else None

    def stop(self) -> None:
        self._stopping.set()
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(WORKER_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                log.error("embedded worker %d did not stop in %.0f s; killing it", process.pid, WORKER_STOP_SECONDS)
                process.kill()
                process.wait()


class _Server(uvicorn.Server):
    """uvicorn, with a hook that runs once the sockets are bound."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None] | None) -> None:
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()


def settings_epilog() -> str:
    """`serve --help`'s list of the MERGE_* variables it reads, with the first sentence of each one's
    description, taken from `Settings` itself so that it cannot go stale."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    names = {name: (prefix + name).upper() for name in Settings.model_fields}
    column = max(map(len, names.values())) + 3
    lines = ["settings, read from the environment (defaults and details: the README's Settings table):"]
    for name, field in Settings.model_fields.items():
        summary = (field.description or "").split(". ")[0].rstrip(".")
        lines += textwrap.wrap(summary, width=110, initial_indent=f"  {names[name]:<{column - 2}}",
                               subsequent_indent=" " * column)
    return "\n".join(lines)


def _keep_running(signum: int, frame: FrameType | None) -> None:
    """uvicorn re-raises the signal that stopped it; this lets `serve` finish its own shutdown first."""


def serve(host: str | None = None, port: int | None = None, fd: int | None = None) -> int:
    settings = start_process("adapter-merge serve")
    host = host or settings.host
    # An inherited socket is wrapped here, not by uvicorn's `fd` option: that one takes every socket for a
    # Unix socket, so asyncio leaves Nagle's algorithm on and each small response waits ~40 ms for an ACK.
    inherited = socket.socket(fileno=fd) if fd is not None else None
    refusal = _auth_refusal(settings, str(inherited.getsockname()[0]) if inherited else host)
    if refusal:
        print(f"adapter-merge serve: {refusal}", file=sys.stderr)
        return 2
    supervisor = None if settings.distributed else WorkerSupervisor(settings.worker_concurrency)
    config = uvicorn.Config(
        create_app(settings, local_workers=supervisor), host=host, port=settings.port if port is None else port,
        log_level=settings.log_level.lower(), log_config=None,  # uvicorn's loggers write through ours
        lifespan="on", timeout_graceful_shutdown=10,
        http=type("Protocol", (HeaderTimeoutProtocol,), {"header_timeout": settings.request_read_seconds}),
        ssl_certfile=settings.tls_certfile, ssl_keyfile=settings.tls_keyfile,
    )
    server = _Server(config, on_started=supervisor.start if supervisor else None)
    _log_mode(settings)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _keep_running)
    try:
        server.run(sockets=[inherited] if inherited else None)
    except SystemExit as exit_:  # uvicorn exits this way when it cannot bind or start
        return int(exit_.code or 1)
    finally:
        if supervisor is not None:
            supervisor.stop()
    return 0


def _auth_refusal(settings: Settings, host: str) -> str | None:
    """Why the server must not start as configured: it would accept anyone from anywhere."""
    if settings.auth == "none":
        if not _is_loopback(host):
            return (f"MERGE_AUTH=none lets anyone do anything, so the server only listens on loopback; "
                    f"{host!r} is not a loopback address")
        return None
    if not settings.authenticated:
        return ("no authentication is configured: set MERGE_API_KEYS_FILE or MERGE_OIDC_ISSUER (see the README's "
                "security section), or MERGE_AUTH=none to run without it on 127.0.0.1")
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _log_mode(settings: Settings) -> None:
    if settings.distributed:
        log.info("distributed mode: jobs go to Celery queue %r; run `adapter-merge worker` to execute them",
                 settings.queue)
    else:
        log.info("embedded mode: job state and artifacts in %s, %d local worker(s)", settings.data_dir.absolute(),
                 settings.worker_concurrency)
