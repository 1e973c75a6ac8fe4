"""A Redis server of the test session's own: `redis-server` on a free loopback port, nothing kept on disk,
stopped when the session ends. The tests never touch a Redis they did not start (a developer's own on 6379
is left alone)."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.loopback import free_port

START_TIMEOUT_SECONDS = 10.0
INSTALL_HINT = ("the service tests need the redis-server binary: `apt-get install redis-server` (Debian/Ubuntu), "
                "`brew install redis` (macOS); .ci/run installs it when it is missing")


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_redis(folder: Path, attempts: int = 5) -> RedisServer:
    """Start redis-server on a free port (a port taken between probing and binding is tried again)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(INSTALL_HINT)
    for _ in range(attempts):
        port = free_port()
        log = (folder / f"redis-{port}.log").open("wb")
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(folder), "--protected-mode", "yes"], stdout=log, stderr=subprocess.STDOUT)
        server = RedisServer(port, process)
        if _answers(server):
            return server
        server.stop()
    raise RuntimeError(f"redis-server did not start on a free port in {attempts} tries (logs in {folder})")


def _answers(server: RedisServer) -> bool:
    client = redis.Redis(port=server.port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    try:
        while time.monotonic() < deadline and server.process.poll() is None:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                time.sleep(0.05)
        return False
    finally:
        client.close()
