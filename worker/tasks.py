"""The Celery task: a thin adapter from the queue to the job runner the embedded mode uses too."""

from __future__ import annotations

from typing import Any

from celery import Celery

from adapter_merge.core.context import JobContext
from adapter_merge.core.logs import job_logging
from adapter_merge.core.messaging import TASK_NAME
from adapter_merge.core.settings import Settings
from adapter_merge.worker.metrics import WorkerMetrics
from adapter_merge.worker.runner import JobRunner


class PoolProcess:
    """The runner of one pool process, built after the fork (no store connection is shared with the parent or
    a sibling); and the worker's metrics, where its jobs are observed."""

    def __init__(self, settings: Settings, metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._runner: JobRunner | None = None

    def runner(self) -> JobRunner:
        if self._runner is None:
            self._runner = JobRunner(JobContext.open(self.settings))
        return self._runner

    def start(self, **_: Any) -> None:
        """Celery's `worker_process_init`, in a new pool process before it takes a job: build the runner and
        import the engine with torch. With one job per process, Celery forks the next process as soon as the
        last one exits, so this happens while the worker waits for work, not while a job waits."""
        self.runner().preload()


def register_tasks(app: Celery, process: PoolProcess) -> None:
    @app.task(name=TASK_NAME, ignore_result=True)
    def run_job(job_id: str) -> None:
        """Claim and run one job; a duplicate or late delivery finds it claimed or finished and returns."""
        runner = process.runner()
        with job_logging(job_id):
            final = runner.run(job_id)
            process.metrics.observe(final, runner.layout)
