"""The registry fixtures: each server is started once per session on 127.0.0.1 (a free port) and torn down at the
end; the function-scoped twins hand a test the same server with its request log emptied (and, for the hub, every
fault healed afterwards), so counts are per test.

`tests/registries/conftest.py` re-exports them; another test folder gets them the same way:

    from tests.registries.fixtures import *  # noqa: F403 (pytest finds fixtures by name)

Repos, buckets and model names outlive a test (the servers are per session): give each test names of its own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.registries.hub import FakeHub
from tests.registries.mlflow_server import MlflowServer, MlflowUnavailable, ensure_venv
from tests.registries.s3 import S3Server
from tools.synthetic import DEMO, write_llama_base, write_lora_adapter

__all__ = ["TinyModels", "hub", "hub_server", "mlflow_server", "s3", "s3_bucket", "s3_server", "tiny_models"]

# Telemetry opt-outs for every client in this process (they enable nothing and point nowhere).
for _name, _value in (("HF_HUB_DISABLE_TELEMETRY", "1"), ("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "1")):
    os.environ.setdefault(_name, _value)


@dataclass(frozen=True)
class TinyModels:
    base: Path
    """A Llama-shaped base (demo shape): config, 3 safetensors shards and their index, ~7.6 MB."""
    adapter: Path
    """A LoRA adapter for it: adapter_config.json, adapter_model.safetensors (~0.6 MB)."""


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    root = tmp_path_factory.mktemp("registry-models")
    base = write_llama_base(root / "base", **DEMO)
    return TinyModels(base, write_lora_adapter(base, root / "lora", r=8))


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """A Hugging Face hub (and its LFS CDN) on loopback: `FakeHub` (see tests/registries/hub.py)."""
    with FakeHub(tmp_path_factory.mktemp("hub")) as server:
        yield server


@pytest.fixture
def hub(hub_server: FakeHub) -> Iterator[FakeHub]:
    """`hub_server` with an empty request log; faults set by the test are healed after it."""
    hub_server.requests.clear()
    yield hub_server
    hub_server.heal()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 on loopback: `S3Server` (see tests/registries/s3.py)."""
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: S3Server) -> S3Server:
    """`s3_server` with an empty request log."""
    s3_server.requests.clear()
    return s3_server


@pytest.fixture
def s3_bucket(s3: S3Server) -> str:
    """A new, versioned bucket of the test's own."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(name, versioned=True)
    return name


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real MLflow tracking server and registry on loopback: `MlflowServer` (see tests/registries/
    mlflow_server.py). Builds .venv-mlflow first if missing (`make mlflow-venv`, a one-off of about a minute);
    skips only if that build fails."""
    try:
        executable = ensure_venv()
    except MlflowUnavailable as error:
        pytest.skip(f"no MLflow server: {error}")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), executable).start()
    yield server
    server.stop()
