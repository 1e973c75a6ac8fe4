"""Log lines as text for people or as JSON objects for log pipelines (`MERGE_LOG_FORMAT`), and the job a line
concerns.

While a worker runs a job, `job_logging(job_id)` puts the id in a context variable and every line logged in
that context carries it; code outside such a context passes `extra={"job_id": ...}`. The JSON formatter is
ours (twenty lines of stdlib) rather than python-json-logger: the fields are fixed and few, and a dependency
of every process kind for them is upkeep without a gain.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_job_id: ContextVar[str | None] = ContextVar("adapter_merge_job_id", default=None)


@contextmanager
def job_logging(job_id: str) -> Iterator[None]:
    """Lines logged inside the block (in this thread or task) name the job."""
    token = _job_id.set(job_id)
    try:
        yield
    finally:
        _job_id.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, job_id when known, and the
    exception's traceback as a field rather than extra lines."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None) or _job_id.get()
        if job_id:
            entry["job_id"] = job_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str) -> None:
    """One handler on the root logger for the whole process: libraries' loggers (uvicorn, Celery) propagate to
    it, and Python warnings become log lines too, so a JSON log holds nothing but JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)
    # httpx logs every request's full URL at INFO: webhook callback URLs and presigned download URLs carry
    # tokens in their query strings, which must not reach the logs.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
