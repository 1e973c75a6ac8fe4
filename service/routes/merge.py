"""POST /merge: check a merge request thoroughly, then queue it, or answer from an identical earlier one."""

from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter, Depends, Response

from adapter_merge.core import reuse
from adapter_merge.core.context import JobContext
from adapter_merge.core.jobs import JobRecord, JobStatus, Progress
from adapter_merge.core.problems import Problem, Problems
from adapter_merge.core.request import MergeRequest
from adapter_merge.core.store.base import JobStore, LockBusy, QuotaExceeded
from adapter_merge.service.deps import Services, ServicesDep, Submitter, require_json
from adapter_merge.service.idempotency import FIELD, IdempotencyKey, KeyedSubmission
from adapter_merge.service.schemas import JOB_LOCATION, JobOut, job_view, problem_responses

router = APIRouter(tags=["merge"])
log = logging.getLogger(__name__)
QUEUE_RETRY_SECONDS = 5
QUOTA_RETRY_SECONDS = 30
ACCEPTED = 202
KEY_HOLD_SPARE_SECONDS = 60.0


@router.post("/merge", status_code=202, response_model=JobOut, dependencies=[Depends(require_json)],
             responses={202: JOB_LOCATION,
                        **problem_responses(400, 401, 403, 404, 408, 409, 413, 415, 422, 429, 503, 507)})
def submit_merge(body: MergeRequest, caller: Submitter, response: Response, services: ServicesDep,
                 idempotency_key: IdempotencyKey = None) -> JobOut:
    """Queue a merge. References are resolved and the adapters checked against the base before anything is
    queued, so a request that cannot work fails now with a 4xx naming the field at fault. An identical earlier
    merge of the caller's tenant is reused instead (unless `reuse` is false): its result, shared at once as a
    new succeeded job, or the job itself while it is still queued or running."""
    store = services.context.store
    if idempotency_key is None:
        job = _submit(body, caller.tenant, services)
    else:
        keyed = KeyedSubmission(store, caller.tenant, idempotency_key, _key_hold_seconds(services.context))
        earlier = keyed.begin(body)
        if earlier is not None:
            assert earlier.job_id is not None and earlier.status_code is not None
            response.status_code = earlier.status_code
            return _answer(response, _replayed(store, earlier.job_id))
        try:
            job = _submit(body, caller.tenant, services)
        except BaseException:
            keyed.abandon()
            raise
        keyed.settle(job.id, ACCEPTED)
    return _answer(response, job)


def _answer(response: Response, job: JobRecord) -> JobOut:
    response.headers["Location"] = f"/jobs/{job.id}"
    return job_view(job)


def _submit(body: MergeRequest, tenant: str, services: Services) -> JobRecord:
    """The job that answers the request: a new one (queued, or sharing an earlier result), or an identical one
    still queued or running. Looking up and creating happen under one lock per (tenant, digest), so that of
    identical requests at once only the first creates a merge."""
    context = services.context
    context.layout.require_free_space(context.settings.min_free_bytes)  # 507 storage-full below the minimum
    _check_artifact_quota(context, tenant)
    checked = services.preflight.check(body, tenant)
    summary = checked.summary
    job = JobRecord(
        id=str(uuid.uuid4()), tenant=tenant, request=body, inputs=checked.inputs, request_digest=checked.digest,
        progress=Progress(tensors_total=summary["tensors_total"], bytes_total=summary["bytes_total"]),
    )
    if not body.reuse:
        return _queue(job, services)
    try:
        with context.store.locked(reuse.lock_name(tenant, checked.digest), reuse.LOCK_SECONDS,
                                  reuse.LOCK_WAIT_SECONDS):
            shared = reuse.share_result(context.store, context.layout, job)
            if shared is not None:
                return _keep_shared(shared, services)
            twin = reuse.running_twin(context.store, job)
            if twin is not None:
                log.info("job request of tenant %s attached to job %s (same request digest)", tenant, twin.id)
                return twin
            return _queue(job, services)
    except LockBusy:
        raise Problem(Problems.SUBMISSION_BUSY, "an identical request of this tenant is being submitted and took "
                      f"longer than {reuse.LOCK_WAIT_SECONDS:g} s; try again",
                      retry_after=QUEUE_RETRY_SECONDS) from None


def _keep_shared(job: JobRecord, services: Services) -> JobRecord:
    """Store a job that shares an earlier result (its files linked already); one that must still publish is
    queued like any job, and its run skips the merge."""
    if job.status is not JobStatus.succeeded:
        return _queue(job, services)
    try:
        services.context.store.create(job)
    except BaseException:
        services.context.layout.remove_job(job.id)
        raise
    log.info("job %s: the result of job %s reused (same request digest)", job.id, job.reused_from)
    return job


def _queue(job: JobRecord, services: Services) -> JobRecord:
    context = services.context
    try:
        context.store.create(job, max_active=context.settings.tenant_max_active_jobs)
    except QuotaExceeded as error:
        context.layout.remove_job(job.id)  # a shared result linked for it, if any
        raise Problem(Problems.TOO_MANY_ACTIVE_JOBS, f"{error}; wait for some to finish",
                      retry_after=QUOTA_RETRY_SECONDS, limit=error.limit) from None
    try:
        services.dispatcher.submit(job.id)
    except Exception as error:
        context.store.delete(job.id, only=list(JobStatus))
        context.layout.remove_job(job.id)
        log.exception("could not queue job %s", job.id)
        raise Problem(Problems.QUEUE_UNAVAILABLE, f"the job queue cannot be reached ({type(error).__name__}); "
                      "nothing was queued, try again", retry_after=QUEUE_RETRY_SECONDS) from error
    return job


def _replayed(store: JobStore, job_id: str) -> JobRecord:
    job = store.get(job_id)
    if job is None:
        raise Problem(Problems.JOB_NOT_FOUND, f"{FIELD}: this key was answered with job {job_id}, which has been "
                      "deleted since", field=FIELD)
    return job


def _key_hold_seconds(context: JobContext) -> float:
    """How long a request may take from claiming its idempotency key to its answer: its preflight, the wait for
    an identical submission, and time to spare."""
    return context.settings.preflight_seconds + reuse.LOCK_WAIT_SECONDS + KEY_HOLD_SPARE_SECONDS


def _check_artifact_quota(context: JobContext, tenant: str) -> None:
    limit = context.settings.tenant_max_artifact_bytes
    if limit is None:
        return
    kept = context.store.artifact_bytes(tenant)
    if kept >= limit:
        raise Problem(Problems.ARTIFACT_QUOTA_EXCEEDED, f"tenant {tenant!r} keeps {kept} bytes of results, the "
                      f"limit is {limit}; delete finished jobs to make room", limit=limit)
