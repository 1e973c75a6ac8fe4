"""The Celery application for distributed mode: one configuration object and `adapter-merge worker`.

Recovery from a dead worker does not rely on Celery redelivery. Messages are acknowledged late and fetched
one at a time (so a busy worker holds no second job), but the job lease in the store decides who runs what:
a reaper (in every worker and in the API) re-queues a running job whose lease expired, and a duplicate or
late-restored message finds the job already claimed or finished and returns at once.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

from celery import Celery, signals
from pydantic import ValidationError

from adapter_merge.core.settings import Settings, get_settings

TASK_NAME = "adapter_merge.run_job"

log = logging.getLogger(__name__)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Everything Celery needs, derived from the service settings."""
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # Long enough that a long queue does not cause redelivery; leases handle dead workers.
            "visibility_timeout": settings.visibility_timeout_seconds,
            "global_keyprefix": f"{settings.redis_prefix}:celery:",
            "socket_timeout": 30,
            "socket_connect_timeout": 5,
        },
        "task_default_queue": settings.queue,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker_concurrency,
        "worker_max_tasks_per_child": settings.worker_max_tasks_per_child or None,
        # A broker hiccup must not abort a long merge: its lease keeps it safe from double execution.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_publish_retry_policy": {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }


def create_celery(settings: Settings) -> Celery:
    app = Celery("adapter_merge", include=["adapter_merge.worker.tasks"])
    app.config_from_object(celery_config(settings))
    return app


def run_worker(concurrency: int | None = None) -> int:
    """`adapter-merge worker`: a Celery worker consuming the merge queue (default one merge at a time)."""
    try:
        settings = get_settings()
    except ValidationError as error:
        print(f"adapter-merge worker: invalid settings:\n{error}", file=sys.stderr)
        return 2
    if not settings.distributed:
        print("adapter-merge worker: MERGE_REDIS_URL is not set; the worker only serves distributed mode "
              "(`adapter-merge serve` runs its own worker in embedded mode)", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = [
        "worker", f"--concurrency={concurrency or settings.worker_concurrency}", f"--queues={settings.queue}",
        f"--loglevel={settings.log_level.upper()}", f"--hostname=merge-{os.getpid()}@{socket.gethostname()}",
        "--without-gossip", "--without-mingle", "--pool=prefork",
    ]
    create_celery(settings).worker_main(argv)
    return 0


# --- the reaper: every worker looks for jobs whose worker died, so recovery needs no API ----------------

_maintenance: Any = None


@signals.worker_ready.connect
def _start_reaper(**_: Any) -> None:
    global _maintenance
    from adapter_merge.core.maintenance import MaintenanceThread
    from adapter_merge.service.dispatch import CeleryDispatcher

    settings = get_settings()
    _maintenance = MaintenanceThread(settings, dispatcher=CeleryDispatcher(settings), retention=False)
    _maintenance.start()


@signals.worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    if _maintenance is not None:
        _maintenance.stop()
