"""MERGE_LOG_FORMAT=json: every line real servers and workers write is one JSON object (uvicorn's and Celery's
lines too), and the lines about a job carry its id."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from adapter_merge.core.logs import JsonFormatter, job_logging
from tests.service.checks import running_with_progress
from tests.service.conftest import ModelSet
from tests.service.harness import FINISHED, Api, Proc, running_cluster, service_env, serving

FIELDS = {"time", "level", "logger", "message"}
CELERY_SHUTDOWN_NOTICE = "worker: Warm shutdown (MainProcess)"
"""Printed by Celery's signal handler straight to stdout (after a blank line), past logging: the one line
that is not JSON."""


def json_lines(proc: Proc) -> list[dict]:
    """Every line of the process's output, each parsed as JSON (a line that is not fails the test)."""
    entries = []
    for number, line in enumerate(proc.log_text().splitlines(), 1):
        if not line or line == CELERY_SHUTDOWN_NOTICE:
            continue
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"{proc.log.name}:{number} is not JSON: {line!r}") from None
    assert entries and all(entry.keys() >= FIELDS for entry in entries), entries[:3]
    return entries


def merge_once(api: Api, request: dict) -> str:
    job = api.wait(api.submit(request)["id"], FINISHED, timeout=60)
    assert job["status"] == "succeeded", job["error"]
    return job["id"]


def about(entries: list[dict], job_id: str) -> list[str]:
    return [entry["message"] for entry in entries if entry.get("job_id") == job_id]


def test_embedded_server_logs_json_with_job_ids(models: ModelSet, tmp_path: Path, small_request: dict,
                                                big_request: dict) -> None:
    """A merge, and a merge cancelled while running (its watch thread logs the cancel)."""
    with serving(service_env(tmp_path / "data", models.root, MERGE_LOG_FORMAT="json"),
                 tmp_path / "server.log") as (proc, api):
        job_id = merge_once(api, small_request)
        cancelled = api.submit(big_request)["id"]
        api.wait(cancelled, running_with_progress, timeout=60)
        assert api.http.post(f"/jobs/{cancelled}/cancel").status_code == 202
        assert api.wait(cancelled, FINISHED, timeout=30)["status"] == "cancelled"
    entries = json_lines(proc)
    messages = about(entries, job_id)
    assert any("attempt 1 starts" in message for message in messages), messages
    assert any("succeeded in" in message for message in messages), messages
    assert f"job {cancelled}: cancel requested" in about(entries, cancelled)  # from the watch thread
    assert {entry["logger"] for entry in entries} >= {"uvicorn.access", "adapter_merge.worker.runner"}


def test_distributed_server_and_worker_log_json_with_job_ids(models: ModelSet, tmp_path: Path,
                                                             redis_namespace: dict[str, str],
                                                             small_request: dict) -> None:
    env = service_env(tmp_path / "data", models.root, MERGE_LOG_FORMAT="json", **redis_namespace)
    with running_cluster(tmp_path, env, [env]) as (server, api, workers):
        job_id = merge_once(api, small_request)
    worker_entries = json_lines(workers[0])
    json_lines(server)
    messages = about(worker_entries, job_id)
    assert any("attempt 1 starts" in message for message in messages), messages
    assert any(entry["logger"].startswith("celery") for entry in worker_entries)


def test_exceptions_and_explicit_job_ids_are_fields() -> None:
    formatter = JsonFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("now",), sys.exc_info())
    with job_logging("job-1"):
        entry = json.loads(formatter.format(failed))
    assert entry["message"] == "failed now" and entry["level"] == "ERROR" and entry["job_id"] == "job-1"
    assert entry["exception"].startswith("Traceback") and "ValueError: boom" in entry["exception"]
    outside = logging.LogRecord("x", logging.INFO, __file__, 1, "reaped", (), None)
    outside.job_id = "job-2"  # what extra={"job_id": ...} does
    assert json.loads(formatter.format(outside))["job_id"] == "job-2"
    assert "job_id" not in json.loads(formatter.format(logging.LogRecord("x", 20, __file__, 1, "idle", (), None)))
