"""What the registry-source tests share (no tests here): settings for a test, pointing this process at a test
server the way a deployment's environment would, fetching a pinned input through the workers' download cache,
and catching the `Problem` a call raises."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import constants

from adapter_merge.core.context import JobContext
from adapter_merge.core.problems import Problem
from adapter_merge.core.settings import Settings
from adapter_merge.core.sources.base import PinnedInput
from adapter_merge.worker.downloads import DownloadCache
from tests.loopback import free_port
from tests.registries.hub import FakeHub
from tests.registries.mlflow_server import MlflowServer
from tests.registries.s3 import S3Server

ALL_REMOTE = "hf://*,s3://*,models:/*"


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    """Every remote source allowed, a short timeout and one retry unless a test says otherwise."""
    values: dict[str, Any] = {"data_dir": tmp_path / "data", "allowed_sources": ALL_REMOTE,
                              "download_timeout_seconds": 5.0, "download_retries": 1, **overrides}
    return Settings(**values)


def closed_endpoint() -> str:
    """An http URL on loopback where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


def use_hub(monkeypatch: pytest.MonkeyPatch, endpoint: str, token: str | None) -> None:
    """This process as if started with HF_ENDPOINT=`endpoint` (which huggingface_hub reads when it is imported,
    into these two constants) and HF_TOKEN=`token` (read on every request)."""
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", token is None)  # None: not a token file's either
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)


def use_env(monkeypatch: pytest.MonkeyPatch, server: FakeHub | S3Server | MlflowServer) -> None:
    """This process with a test server's environment (AWS_*, MLFLOW_*; the hub's through `use_hub`)."""
    if isinstance(server, FakeHub):
        use_hub(monkeypatch, server.endpoint, server.token)
        return
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)


def fetch(settings: Settings, pinned: PinnedInput, field: str = "base_model") -> Path:
    """The folder of `pinned` as a worker gets it: downloaded into the cache, then verified."""
    context = JobContext.open(settings)
    try:
        cache = DownloadCache(context, "tests:1")
        return cache.fetch(pinned, context.sources.remote(pinned.scheme), field, "job-1", lambda count: None).folder
    finally:
        context.close()


def problem_of(call: Callable[[], object]) -> Problem:
    with pytest.raises(Problem) as caught:
        call()
    return caught.value


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
