"""POST /merge: check a merge request thoroughly, then queue it."""

from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter, Depends, Response

from adapter_merge.core.context import JobContext
from adapter_merge.core.jobs import JobRecord, JobStatus, Progress
from adapter_merge.core.problems import Problem, Problems
from adapter_merge.core.request import MergeRequest
from adapter_merge.core.store.base import QuotaExceeded
from adapter_merge.service.deps import ServicesDep, Submitter, require_json
from adapter_merge.service.schemas import JOB_LOCATION, JobOut, job_view, problem_responses

router = APIRouter(tags=["merge"])
log = logging.getLogger(__name__)
QUEUE_RETRY_SECONDS = 5
QUOTA_RETRY_SECONDS = 30


@router.post("/merge", status_code=202, response_model=JobOut, dependencies=[Depends(require_json)],
             responses={202: JOB_LOCATION, **problem_responses(400, 401, 403, 408, 413, 415, 422, 429, 503, 507)})
def submit_merge(body: MergeRequest, caller: Submitter, response: Response, services: ServicesDep) -> JobOut:
    """Queue a merge. References are resolved and the adapters checked against the base before anything is
    queued, so a request that cannot work fails now with a 4xx naming the field at fault."""
    context = services.context
    context.layout.require_free_space(context.settings.min_free_bytes)  # 507 storage-full below the minimum
    _check_artifact_quota(context, caller.tenant)
    checked = services.preflight.check(body, caller.tenant)
    summary = checked.summary
    job = JobRecord(
        id=str(uuid.uuid4()), tenant=caller.tenant, request=body, inputs=checked.inputs,
        progress=Progress(tensors_total=summary["tensors_total"], bytes_total=summary["bytes_total"]),
    )
    try:
        context.store.create(job, max_active=context.settings.tenant_max_active_jobs)
    except QuotaExceeded as error:
        raise Problem(Problems.TOO_MANY_ACTIVE_JOBS, f"{error}; wait for some to finish",
                      retry_after=QUOTA_RETRY_SECONDS, limit=error.limit) from None
    try:
        services.dispatcher.submit(job.id)
    except Exception as error:
        context.store.delete(job.id, only=list(JobStatus))
        log.exception("could not queue job %s", job.id)
        raise Problem(Problems.QUEUE_UNAVAILABLE, f"the job queue cannot be reached ({type(error).__name__}); "
                      "nothing was queued, try again", retry_after=QUEUE_RETRY_SECONDS) from error
    response.headers["Location"] = f"/jobs/{job.id}"
    return job_view(job)


def _check_artifact_quota(context: JobContext, tenant: str) -> None:
    limit = context.settings.tenant_max_artifact_bytes
    if limit is None:
        return
    kept = context.store.artifact_bytes(tenant)
    if kept >= limit:
        raise Problem(Problems.ARTIFACT_QUOTA_EXCEEDED, f"tenant {tenant!r} keeps {kept} bytes of results, the "
                      f"limit is {limit}; delete finished jobs to make room", limit=limit)
