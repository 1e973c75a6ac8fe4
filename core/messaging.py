"""The contract between the API that publishes merge messages and the workers that consume them, as plain
data: both sides build their Celery clients from it, so neither imports the other's code."""

from __future__ import annotations

from typing import Any

from adapter_merge.core.settings import Settings

TASK_NAME = "adapter_merge.run_job"
"""The task a message names; its one argument is the job id."""


def broker_options(settings: Settings) -> dict[str, Any]:
    """The Celery settings publisher and consumer must agree on: broker, key prefix, queue, serialization."""
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
        "task_publish_retry_policy": {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
    }
