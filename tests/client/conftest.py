"""Real servers for the client tests: `adapter-merge serve` subprocesses (embedded mode) on the service tests'
small model set, one with authentication off and one with API keys.

    service        session   URL of a server with MERGE_AUTH=none (hf://unreachable/* allowed, its hub down)
    keyed_service  session   KeyedService: URL of a server that wants API keys, and the keys (KEYS)
    merged         session   a Job (client view) of a small merge that succeeded on `service`
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapter_merge.client import Client, Job
from tests.service.conftest import ModelSet, models
from tests.service.harness import service_env, start_server

__all__ = ["KEYS", "KeyedService", "keyed_service", "merged", "models", "service"]

KEYS = {"submit-key": ("team-a", "submit"), "read-key": ("team-a", "read")}
"""API key -> (tenant, role) of the keyed server."""
UNREACHABLE_HUB = {"MERGE_ALLOWED_SOURCES": "hf://unreachable/*", "HF_ENDPOINT": "http://127.0.0.1:9",
                   "MERGE_DOWNLOAD_RETRIES": "0"}
"""`service` lets requests name a hub that refuses connections: a real 503 with Retry-After."""
SMALL = ("small/base", ["small/lora", "small/dora"], [1.0, 0.5])
"""base, adapters and weights of the small merge (the service tests' small_request)."""


@contextmanager
def serving(tmp: Path, models_root: Path, **settings: str) -> Iterator[str]:
    """A server with these settings (on top of the harness's), stopped afterwards; yields its URL."""
    proc, api = start_server(service_env(tmp / "data", models_root, **settings), tmp / "server.log")
    try:
        yield api.base_url
    finally:
        api.close()
        proc.stop()


@pytest.fixture(scope="session")
def service(models: ModelSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(tmp_path_factory.mktemp("client-service"), models.root, **UNREACHABLE_HUB) as url:
        yield url


@dataclass(frozen=True)
class KeyedService:
    url: str
    keys: dict[str, tuple[str, str]]


@pytest.fixture(scope="session")
def keyed_service(models: ModelSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedService]:
    tmp = tmp_path_factory.mktemp("client-keyed-service")
    keys_file = tmp / "keys.json"
    keys_file.write_text(json.dumps({"keys": [
        {"sha256": hashlib.sha256(key.encode()).hexdigest(), "tenant": tenant, "role": role}
        for key, (tenant, role) in KEYS.items()]}))
    with serving(tmp, models.root, MERGE_AUTH="required", MERGE_API_KEYS_FILE=str(keys_file)) as url:
        yield KeyedService(url, KEYS)


@pytest.fixture(scope="session")
def merged(service: str) -> Job:
    base, adapters, weights = SMALL
    with Client(service) as client:
        return client.wait(client.submit(base, adapters, weights=weights), timeout=120)
