"""Never merge the same thing twice: a submission whose request digest (`core.digest`) matches an earlier job of
the same tenant shares that job's result or waits for it, instead of merging again (README: Reuse).

The API decides under a lock per (tenant, digest), so that of many identical submissions at once exactly one
creates the merge and the others find it. Results are never shared across tenants.
"""

from __future__ import annotations

from adapter_merge.core.jobs import ACTIVE_STATUSES, JobRecord, JobStatus, Metrics, Timings, utcnow
from adapter_merge.core.layout import DataLayout
from adapter_merge.core.problems import PROBLEM_TYPE_PREFIX, Problems
from adapter_merge.core.store.base import JobStore
from adapter_merge.core.webhooks import pending_delivery

LOCK_SECONDS = 60.0
"""Longest a submission holds its (tenant, digest) lock should it die holding it; linking a result (or copying
it, across filesystems) happens under it."""
LOCK_WAIT_SECONDS = 10.0
"""Longest a submission waits for an identical one to be created (each holds the lock for a few store calls)."""
PUBLISH_FAULTS = frozenset(PROBLEM_TYPE_PREFIX + kind.slug for kind in
                           (Problems.PUBLISH_FAILED, Problems.PUBLISH_CONFLICT, Problems.REGISTRY_UNAVAILABLE))
"""How a job fails whose merge succeeded but whose publishing did not: its merged result is kept, so trying the
request again only publishes."""


def lock_name(tenant: str, digest: str) -> str:
    """The store lock around looking up and creating jobs of one digest (the digest is fixed-length hex, so
    no two (tenant, digest) pairs share a name)."""
    return f"reuse:{tenant}:{digest}"


def running_twin(store: JobStore, job: JobRecord) -> JobRecord | None:
    """An active job (queued or running, not being cancelled) of `job`'s tenant and digest that will also do
    what `job` asks besides merging (the same `publish` and `callback_url`), for `job`'s caller to attach to."""
    assert job.request_digest is not None
    for earlier in store.with_digest(job.tenant, job.request_digest, ACTIVE_STATUSES):
        if (not earlier.cancel_requested and earlier.request.publish == job.request.publish
                and earlier.request.callback_url == job.request.callback_url):
            return earlier
    return None


def share_result(store: JobStore, layout: DataLayout, job: JobRecord) -> JobRecord | None:
    """`job` (not stored yet) with the result of the newest job of its tenant and digest that merged (it succeeded,
    or only its publishing failed; a job that merged itself before one that shared) and whose files are all still
    on disk, linked into `job`'s own folder (attempt 0); None when there is none.

    Without `publish` the job is done: succeeded at once. With it the job still has to publish, so it is
    queued with `reused_from` set and its result in place; its run must not merge (see `DataLayout.share`)."""
    assert job.request_digest is not None
    earlier_jobs = store.with_digest(job.tenant, job.request_digest, [JobStatus.succeeded, JobStatus.failed])
    # The job that merged first, then the ones sharing its result (newest first within each): identical requests
    # all name the merge while it is kept, a share once it is gone.
    for earlier in sorted(earlier_jobs, key=lambda candidate: candidate.reused_from is not None):
        if not _merged(earlier) or not _result_on_disk(layout, earlier):
            continue
        try:
            layout.share(earlier.id, earlier.attempt, job.id)
        except FileNotFoundError:  # deleted since it was looked at
            continue
        return _reusing(job, earlier, store.now())
    return None


def _merged(job: JobRecord) -> bool:
    return job.status is JobStatus.succeeded or (job.error or {}).get("type") in PUBLISH_FAULTS


def _result_on_disk(layout: DataLayout, job: JobRecord) -> bool:
    folder = layout.result_dir(job.id, job.attempt)
    try:
        return bool(job.artifacts) and all((folder / artifact.path).stat().st_size == artifact.size
                                           for artifact in job.artifacts)
    except FileNotFoundError:
        return False


def _reusing(job: JobRecord, earlier: JobRecord, now: float) -> JobRecord:
    """`job` sharing `earlier`'s result; `now` is the store's clock, from which a callback of a job created
    finished is due (a job that still publishes gets its callback when its run ends)."""
    update: dict[str, object] = {
        "reused_from": earlier.id, "artifacts": earlier.artifacts, "metrics": Metrics(cache_hit=True),
        "notes": [*job.notes, f"the result of job {earlier.id} (same request digest), shared instead of merged"],
    }
    if job.request.publish is None:
        finished = utcnow()
        update.update(status=JobStatus.succeeded, started_at=finished, finished_at=finished, progress=earlier.progress,
                      timings=Timings(total=(finished - job.created_at).total_seconds()),
                      webhook=pending_delivery(job, now))
    return job.model_copy(update=update)
