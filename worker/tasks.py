"""Celery tasks: a thin adapter from the queue to the job runner the embedded mode uses too."""

from __future__ import annotations

import os

from celery import shared_task

from adapter_merge.core.settings import get_settings
from adapter_merge.worker.celery_app import TASK_NAME
from adapter_merge.worker.runner import JobRunner

_runner: tuple[int, JobRunner] | None = None


def job_runner() -> JobRunner:
    """One runner per process, made after the fork so no store connection is shared with the parent."""
    global _runner
    if _runner is None or _runner[0] != os.getpid():
        _runner = (os.getpid(), JobRunner(get_settings()))
    return _runner[1]


@shared_task(name=TASK_NAME, ignore_result=True)
def run_job(job_id: str) -> None:
    """Claim and run one job; a duplicate or late delivery finds it claimed or finished and returns."""
    job_runner().run(job_id)
