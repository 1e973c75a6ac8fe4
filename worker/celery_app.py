"""Distributed mode's worker process: the Celery app and `adapter-merge worker`.

Recovery from a dead worker does not rely on Celery redelivery. Messages are acknowledged late and fetched
one at a time (so a busy worker holds no second job), but the job lease in the store decides who runs what:
a reaper (in every worker and in the API) re-queues a running job whose lease expired, and a duplicate or
late-restored message finds the job already claimed or finished and returns at once.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from celery import Celery, signals

from adapter_merge.core.context import JobContext
from adapter_merge.core.maintenance import MaintenanceThread
from adapter_merge.core.messaging import TASK_NAME, broker_options
from adapter_merge.core.process import start_process
from adapter_merge.core.settings import Settings
from adapter_merge.worker.metrics import WorkerMetrics, serve_metrics
from adapter_merge.worker.presence import Presence
from adapter_merge.worker.runner import worker_identity
from adapter_merge.worker.tasks import PoolProcess, register_tasks

PROCESS_START_SECONDS = 120.0
"""How long a new pool process may take to get ready (import torch) before Celery gives up on it."""


def worker_options(settings: Settings) -> dict[str, Any]:
    """How a merge worker consumes: late acks, one message at a time, a fresh process per job."""
    return {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker_concurrency,
        "worker_max_tasks_per_child": settings.worker_max_tasks_per_child or None,
        # A pool process imports torch before it reports ready (PoolProcess.start): far more than Celery's 4 s on
        # a loaded machine, and Celery would kill it and fork another, forever.
        "worker_proc_alive_timeout": PROCESS_START_SECONDS,
        # A broker hiccup must not abort a long merge: its lease keeps it safe from double execution.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }


def create_worker_app(settings: Settings, metrics: WorkerMetrics) -> Celery:
    app = Celery("adapter_merge")
    app.config_from_object({**broker_options(settings), **worker_options(settings)})
    process = PoolProcess(settings, metrics)
    register_tasks(app, process)
    signals.worker_process_init.connect(process.start, weak=False)
    return app


class CeleryRequeue:
    """The reaper's way to hand a recovered job back to the queue, from inside a worker."""

    def __init__(self, app: Celery, queue: str) -> None:
        self.app, self.queue = app, queue

    def submit(self, job_id: str) -> None:
        self.app.send_task(TASK_NAME, args=[job_id], queue=self.queue)

    def ping(self) -> None:
        return None


class Reaper:
    """Every worker looks for jobs whose worker died, so recovery needs no API, and records its heartbeat for
    the API's readiness; runs in the main process."""

    def __init__(self, settings: Settings, app: Celery, metrics: WorkerMetrics) -> None:
        self.settings, self.app, self.metrics = settings, app, metrics
        self.thread: MaintenanceThread | None = None
        self.presence: Presence | None = None
        self.context: JobContext | None = None

    def start(self, **_: Any) -> None:
        self.context = JobContext.open(self.settings)
        self.thread = MaintenanceThread(self.context, CeleryRequeue(self.app, self.settings.queue), retention=False,
                                        on_lease_lost=self.metrics.leases_lost.inc)
        self.thread.start()
        self.presence = Presence(self.context.store, self.settings, worker_identity())
        self.presence.start()

    def stop(self, **_: Any) -> None:
        if self.thread is not None and self.presence is not None and self.context is not None:
            self.presence.stop()
            self.thread.stop()
            self.context.close()


def run_worker(concurrency: int | None = None, metrics_address: tuple[str, int] | None = None) -> int:
    """`adapter-merge worker`: a Celery worker consuming the merge queue (default one merge at a time), serving
    its metrics and those of its pool processes at `metrics_address` (host, port) if given."""
    settings = start_process("adapter-merge worker")
    if not settings.distributed:
        print("adapter-merge worker: MERGE_REDIS_URL is not set; the worker only serves distributed mode "
              "(`adapter-merge serve` runs its own worker in embedded mode)", file=sys.stderr)
        return 2
    metrics = WorkerMetrics()
    app = create_worker_app(settings, metrics)
    reaper = Reaper(settings, app, metrics)
    signals.worker_ready.connect(reaper.start, weak=False)
    signals.worker_shutdown.connect(reaper.stop, weak=False)
    if metrics_address is not None:
        serve_metrics(*metrics_address)
    argv = [
        *(["--quiet"] if settings.log_format == "json" else []),  # no banner: it is text, printed past logging
        "worker", f"--concurrency={concurrency or settings.worker_concurrency}", f"--queues={settings.queue}",
        f"--loglevel={settings.log_level.upper()}", f"--hostname=merge-{os.getpid()}@{socket.gethostname()}",
        "--without-gossip", "--without-mingle", "--pool=prefork",
    ]
    app.worker_main(argv)
    return 0
