"""Jobs: list, inspect, cancel, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from adapter_merge.core.jobs import ACTIVE_STATUSES, JobRecord, JobStatus
from adapter_merge.core.problems import Problem, Problems
from adapter_merge.service.deps import JobDep, Reader, ServicesDep, Submitter
from adapter_merge.service.schemas import JobOut, JobPage, job_view, problem_responses

router = APIRouter(prefix="/jobs", tags=["jobs"])
MAX_OFFSET = 2**31 - 1
"""Far beyond any real listing, and within what every store's integers hold."""


@router.get("", response_model=JobPage, responses=problem_responses(401, 403, 422, 503))
def list_jobs(
    services: ServicesDep,
    principal: Reader,
    status: Annotated[list[JobStatus] | None, Query(description="Only these statuses (repeatable).")] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="Page size.")] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Jobs to skip, newest first.")] = 0,
) -> JobPage:
    """Jobs of the caller's tenant (an admin's: of every tenant), newest first."""
    jobs, total = services.context.store.list(status or None, limit=limit, offset=offset,
                                              tenant=principal.listed_tenant)
    return JobPage(items=[job_view(job) for job in jobs], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut, responses=problem_responses(401, 403, 404, 422, 503))
async def get_job(job: JobDep) -> JobOut:
    """Status, progress (updated while running), timings, metrics, error and artifacts of one job."""
    return job_view(job)


@router.post("/{job_id}/cancel", response_model=JobOut, responses={
    200: {"description": "Cancelled at once (it was queued), or cancelled already."},
    202: {"model": JobOut, "description": "Running: its worker stops at the next tensor and removes the partial "
          "output; the job shows `cancel_requested` until it has."},
    **problem_responses(401, 403, 404, 409, 422, 503)})
def cancel_job(job: JobDep, caller: Submitter, response: Response, services: ServicesDep) -> JobOut:
    """Cancel a queued job at once (200) or ask a running one to stop (202). Cancelling twice is harmless."""
    if job.status is JobStatus.cancelled:
        return job_view(job)
    updated = services.context.store.request_cancel(job.id) if job.status in ACTIVE_STATUSES else None
    if updated is None:
        current = services.context.store.get(job.id) or job
        raise Problem(Problems.JOB_FINISHED, f"job {job.id} already {current.status.value}; nothing to cancel",
                      status_now=current.status.value)
    if updated.status is JobStatus.running:
        response.status_code = 202
    return job_view(updated)


@router.delete("/{job_id}", status_code=204, response_class=Response,
               responses={204: {"description": "Deleted, with its artifacts."},
                          **problem_responses(401, 403, 404, 409, 422, 503, 507)})
def delete_job(job: JobDep, caller: Submitter, services: ServicesDep) -> Response:
    """Remove a finished job and its artifacts."""
    # This works on a full disk too: it is how space is freed.
    store, layout = services.context.store, services.context.layout
    if job.status in ACTIVE_STATUSES:
        raise _still_active(job)
    try:
        deleted = store.delete(job.id)
    except Problem as problem:
        if problem.kind is not Problems.STORAGE_FULL:
            raise
        layout.remove_job(job.id)  # a disk too full for the store to write: the finished job's files go first
        deleted = store.delete(job.id)
    if not deleted:
        raise _still_active(job)
    layout.remove_job(job.id)
    return Response(status_code=204)


def _still_active(job: JobRecord) -> Problem:
    return Problem(Problems.JOB_ACTIVE, f"job {job.id} is {job.status.value}; cancel it before deleting it",
                   status_now=job.status.value)
