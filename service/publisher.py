"""Distributed mode: the API hands a job to the workers as one Celery message, sent by task name with a
client configured from the shared message contract, so the API needs none of the worker's code."""

from __future__ import annotations

from celery import Celery

from adapter_merge.core.messaging import TASK_NAME, broker_options
from adapter_merge.core.settings import Settings


class CeleryPublisher:
    def __init__(self, settings: Settings) -> None:
        self.app = Celery("adapter_merge_api")
        self.app.config_from_object(broker_options(settings))
        self.queue = settings.queue

    def submit(self, job_id: str) -> None:
        self.app.send_task(TASK_NAME, args=[job_id], queue=self.queue)

    def ping(self) -> None:
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=5)  # no 2 s pause on failure
