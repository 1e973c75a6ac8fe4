"""A Python client of the merge service: submit, follow, list, cancel, delete and download jobs.

Light on purpose, for integrators: it imports httpx and the standard library only (nothing of the server,
no torch), and reads jobs tolerantly, so a newer server's extra fields never break it.
"""

from adapter_merge.client.aio import AsyncClient
from adapter_merge.client.errors import (
    ApiError,
    BadRequest,
    ChecksumMismatch,
    Conflict,
    Forbidden,
    JobCancelled,
    JobFailed,
    JobNotSucceeded,
    NotFound,
    RateLimited,
    ServerError,
    Unauthorized,
    Unavailable,
    ValidationFailed,
    WaitTimeout,
)
from adapter_merge.client.models import Artifact, Job, Progress
from adapter_merge.client.sync import Client

__all__ = [
    "ApiError",
    "Artifact",
    "AsyncClient",
    "BadRequest",
    "ChecksumMismatch",
    "Client",
    "Conflict",
    "Forbidden",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobNotSucceeded",
    "NotFound",
    "Progress",
    "RateLimited",
    "ServerError",
    "Unauthorized",
    "Unavailable",
    "ValidationFailed",
    "WaitTimeout",
]
