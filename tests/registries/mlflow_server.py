"""A real MLflow tracking server and model registry on 127.0.0.1, and helpers to publish folders to it.

The server is the full `mlflow` package (~850 MB, with pins of its own), so it runs from a virtualenv of its
own, `.venv-mlflow`, built by `make mlflow-venv` (on first use if missing); the project's venv has only the
client, mlflow-skinny. The server stores runs and the registry in SQLite and artifacts in a folder, and proxies
artifacts (`mlflow-artifacts:` URIs), so clients need nothing but its URL. Its background job runner (a pool of
huey consumers, for GenAI jobs) is turned off, and so is telemetry.

Publishing goes the way the server accepts (it refuses local-path sources outside a run): log the folder as a
run's artifacts, create a model version from `runs:/<run>/<path>`, wait until READY, then set an alias.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.loopback import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv-mlflow"
MLFLOW = VENV / "bin" / "mlflow"
INSTALLED = VENV / ".installed"
START_TIMEOUT = 90.0
"""Healthy in ~10 s here; the first start after a build also compiles the package."""
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
"""Telemetry off, for the server and for every client."""


class MlflowUnavailable(RuntimeError):
    """The server's venv could not be built (pip failed): tests that need MLflow skip with this message."""


@dataclass(frozen=True)
class PublishedVersion:
    """A model version created by `MlflowServer.publish`."""

    name: str
    version: str
    run_id: str
    source: str
    """`runs:/<run_id>/<artifact_path>`."""

    @property
    def uri(self) -> str:
        """`models:/NAME/VERSION`."""
        return f"models:/{self.name}/{self.version}"


def ensure_venv(timeout: float = 1200.0) -> Path:
    """The `mlflow` executable of `.venv-mlflow`, built with `make mlflow-venv` if it is not there yet (one
    build at a time across processes); MlflowUnavailable if the build fails."""
    if INSTALLED.exists():
        return MLFLOW
    lock_path = Path(tempfile.gettempdir()) / f"adapter-merge-mlflow-venv-{os.getuid()}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not INSTALLED.exists():
            try:
                built = subprocess.run(["make", "-C", str(REPO), "mlflow-venv"], capture_output=True, text=True,
                                       timeout=timeout, check=False)
            except (OSError, subprocess.TimeoutExpired) as error:
                raise MlflowUnavailable(f"make mlflow-venv could not run: {error}") from error
            if built.returncode != 0 or not INSTALLED.exists():
                tail = "\n".join((built.stdout + built.stderr).splitlines()[-15:])
                raise MlflowUnavailable(f"make mlflow-venv failed (exit {built.returncode}):\n{tail}")
    return MLFLOW


class MlflowServer:
    """`mlflow server` in a process group of its own, on a free loopback port, storing under `root`."""

    def __init__(self, root: Path, executable: Path = MLFLOW) -> None:
        self.root = root
        self.executable = executable
        self.url = ""
        self.log_path = root / "server.log"
        self._process: subprocess.Popen[bytes] | None = None

    # -- life cycle ---------------------------------------------------------------------------------------------

    def start(self, attempts: int = 3) -> MlflowServer:
        """Start and wait for /health; a lost race for the port is retried on another one."""
        self.root.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            port = free_port()
            self._spawn(port)
            try:
                wait_for(self._healthy_or_exited, START_TIMEOUT, lambda: f"mlflow server healthy:\n{self.log_tail()}")
            except AssertionError:
                self.stop()
                raise
            if self._process is not None and self._process.poll() is None:
                return self
            if "address already in use" not in self.log_tail().lower() or attempt == attempts - 1:
                raise RuntimeError(f"mlflow server exited ({self._process and self._process.returncode}):\n"
                                   f"{self.log_tail()}")
        raise AssertionError("unreachable")

    def _spawn(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
        env.update(QUIET, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("PYTHONPATH", None)
        command = [str(self.executable), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                   "--artifacts-destination", str(self.root / "artifacts")]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)

    def _healthy_or_exited(self) -> bool:
        if self._process is None or self._process.poll() is not None:
            return True
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200 and response.read().strip() == b"OK"
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """SIGTERM the whole process group (uvicorn and its worker), SIGKILL whatever is left after 10 s."""
        process, self._process = self._process, None
        if process is None:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # a worker that outlived the leader
            os.killpg(process.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- clients ------------------------------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to use this server through mlflow's defaults (`models:/` URIs resolve against
        MLFLOW_REGISTRY_URI / MLFLOW_TRACKING_URI, never an explicit client's URI); telemetry off."""
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_REGISTRY_URI": self.url, **QUIET}

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.url, registry_uri=self.url)

    # -- publishing ---------------------------------------------------------------------------------------------

    def publish(self, folder: Path, name: str, *, alias: str | None = None, tags: dict[str, str] | None = None,
                artifact_path: str = "model", experiment: str = "registry-tests") -> PublishedVersion:
        """Register `folder` as a new version of model `name` (created if missing): its files become the
        artifacts of a new run under `artifact_path`; the version waits until READY; `alias` then points at it."""
        client = self.client()
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        run_id = client.create_run(experiment_id).info.run_id
        client.log_artifacts(run_id, str(folder), artifact_path=artifact_path)
        client.set_terminated(run_id)
        try:
            client.create_registered_model(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"runs:/{run_id}/{artifact_path}"
        version = client.create_model_version(name, source=source, run_id=run_id, tags=tags).version
        wait_for(lambda: client.get_model_version(name, version).status == "READY", 30,
                 f"model version {name}/{version} READY")
        if alias is not None:
            client.set_registered_model_alias(name, alias, version)
        return PublishedVersion(name, str(version), run_id, source)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point (or move) `alias` of model `name` at `version`."""
        self.client().set_registered_model_alias(name, alias, version)
