"""Handing a queued job to whatever runs it: Celery on Redis, or nobody (the embedded worker polls the store).

The job record is the source of truth in both modes; a Celery message is only a wake-up call, so sending one
twice is harmless (the second delivery finds the job claimed and returns).
"""

from __future__ import annotations

from typing import Protocol

from adapter_merge.core.settings import Settings


class Dispatcher(Protocol):
    def submit(self, job_id: str) -> None: ...

    def ping(self) -> None:
        """Raise if jobs cannot be handed over now."""
        ...


class LocalDispatcher:
    """Embedded mode: the local worker claims queued jobs straight from the SQLite store."""

    def submit(self, job_id: str) -> None:
        return None

    def ping(self) -> None:
        return None


class CeleryDispatcher:
    """Distributed mode: one Celery message per (re)queued job on the configured queue."""

    def __init__(self, settings: Settings) -> None:
        from adapter_merge.worker.celery_app import TASK_NAME, create_celery

        self.app = create_celery(settings)
        self.task_name = TASK_NAME
        self.queue = settings.queue

    def submit(self, job_id: str) -> None:
        self.app.send_task(self.task_name, args=[job_id], queue=self.queue)

    def ping(self) -> None:
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=5)


def open_dispatcher(settings: Settings) -> Dispatcher:
    return CeleryDispatcher(settings) if settings.distributed else LocalDispatcher()
