"""The job runner: the one piece of code that executes a merge job, for Celery tasks and the embedded
worker alike.

A run claims the job (queued -> running, next attempt, fresh lease), starts from an empty scratch folder,
resolves the references again, lets the engine write into scratch, renames the finished folder into the
artifacts area, publishes it to the request's target if it names one, and records timings, metrics, artifacts
and where it was published. A job that shares an earlier identical job's result (`reused_from`) and still has to
publish skips the merge and only publishes. Every write to the job is fenced by the attempt number, so a worker
that lost its lease (and whose job now runs elsewhere) cannot overwrite the rerun.

Publishing failed: the job fails with the target's problem and keeps its merged files on disk, recorded in its
artifacts (they count against the tenant's quota, and retention deletes them), so that the merge is not lost to a
registry's outage: a retry can share them instead of merging again (`core.reuse`). Cancelled, or stopped, while
publishing: the result is removed with the rest of the run, and the target holds nothing a reader would trust.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from adapter_merge.core.context import JobContext
from adapter_merge.core.jobs import Artifact, JobRecord, JobStatus, Metrics, Published, Timings, utcnow
from adapter_merge.core.preflight import FolderOf, adapter_field, merge_problem, pin_request, resolve_request
from adapter_merge.core.problems import DISK_FULL_ERRNOS, Problem, Problems, storage_detail
from adapter_merge.core.publish.base import TO_FIELD, ByteCounter, lineage_of
from adapter_merge.core.sources.base import PinnedInput
from adapter_merge.core.sources.registry import LOCAL_SCHEME
from adapter_merge.core.store import STORE_UNAVAILABLE
from adapter_merge.worker.downloads import Arrivals, DownloadCache, Fetched
from adapter_merge.worker.engine import MergeCancelled, MergeError, MergeReport
from adapter_merge.worker.locks import LockKeeper, held
from adapter_merge.worker.watch import JobWatch

log = logging.getLogger(__name__)
POLL_SECONDS = 0.1
"""How often a paced upload checks whether its run must stop."""


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobRunner:
    def __init__(self, context: JobContext) -> None:
        self.context = context
        self.settings, self.store, self.layout = context.settings, context.store, context.layout
        self.downloads = DownloadCache(context, worker_identity())
        self.shutdown = threading.Event()
        """Set to stop the current merge and put its job back in the queue (worker shutting down)."""

    def preload(self) -> None:
        """Get this merge process ready before any job is claimed, once: take its CPU priority
        (`MERGE_WORKER_NICE`), and import the engine, and with it torch (about a second): a merge process started
        ahead of its job (a Celery pool process, the embedded worker's) is then ready when it comes."""
        os.nice(self.settings.worker_nice)
        started = time.perf_counter()
        importlib.import_module("adapter_merge.worker.engine.pipeline")
        log.info("merge process %d ready for a job (engine loaded in %.1f s)", os.getpid(),
                 time.perf_counter() - started)

    def run(self, job_id: str) -> JobRecord | None:
        """Claim `job_id` and run it. A job that is not queued (a duplicate delivery, or already claimed,
        finished or cancelled) is left alone: that is what makes the Celery task idempotent."""
        job = self.store.claim(job_id, worker_identity(), self.settings.lease_seconds)
        if job is None:
            log.info("job %s is not queued; nothing to do", job_id)
            return None
        return self.execute(job)

    def execute(self, job: JobRecord) -> JobRecord | None:
        """Run a job this process has claimed; returns the final record (None if the run was superseded)."""
        log.info("job %s: attempt %d starts on %s", job.id, job.attempt, worker_identity())
        self.layout.clean_work(job.id)
        for earlier in range(1, job.attempt):  # a run killed while publishing left its result, never served
            _remove_quietly(self.layout.result_dir(job.id, earlier))
        with JobWatch(self.store, job, self.settings, self.shutdown) as watch:
            try:
                try:
                    return self._publish_only(job, watch) if job.reused_from else self._merge(job, watch)
                finally:  # before a failure is recorded: on a full disk, the store may need the space
                    self.layout.clean_attempt(job.id, job.attempt)
                    self.downloads.release(job.id)
            except MergeCancelled:
                return self._stopped(job, watch)
            except _PublishFailed as failed:
                return self._fail(job, failed.error, watch, artifacts=failed.artifacts, notes=failed.notes)
            except Exception as error:
                return self._fail(job, error, watch)

    def _merge(self, job: JobRecord, watch: JobWatch) -> JobRecord | None:
        from adapter_merge.worker.engine import merge  # imports torch: only where merges run

        inputs = job.inputs or pin_request(job.request, self.context.sources, job.tenant)
        arrivals = Arrivals(self.downloads, job.id, watch.downloading, watch.should_stop)
        try:
            # The adapters first: the merge reads their weights from the first changed tensor on, and the base's
            # shards one after another.
            needed = [*((pinned, adapter_field(index)) for index, pinned in enumerate(inputs[1:])),
                      (inputs[0], "base_model")]
            arrivals.prepare([(pinned, self.context.sources.remote(pinned.scheme), field) for pinned, field in needed
                              if pinned.scheme != LOCAL_SCHEME])
            resolved = resolve_request(job.request, inputs, self._folder_finder(arrivals),
                                       (*self.settings.roots, self.settings.cache_root))
            # From the claim on: starting the merge process and loading the engine count as getting ready; what
            # planning reads of remote inputs is part of their download.
            resolve_seconds = _seconds(job.started_at, utcnow()) - arrivals.staging_seconds
            # Success is only reported for a result on disk (fsync); inputs are hashed once per file version,
            # except while some still download: they are read where they move from once in, and their
            # checksums would be remembered under paths that are gone by then.
            options = replace(resolved.options, fsync=True,
                              checksum_cache=None if arrivals.streaming else self.layout.checksum_cache,
                              await_file=arrivals.await_file if arrivals.streaming else None)
            arrivals.start()
            try:
                report = merge(resolved.base, resolved.adapters, self.layout.attempt_output(job.id, job.attempt),
                               options, progress=watch.progress, should_stop=watch.should_stop)
            except MergeCancelled:
                raise
            except MergeError as error:  # reported with the client's references, not the server's paths
                raise merge_problem(error, resolved.names) from error
            arrivals.finish()
        finally:
            arrivals.close()
            self.downloads.evict()
        download_seconds = arrivals.seconds if arrivals.fetched else 0.0
        if watch.lost or watch.cancel_requested:  # superseded or cancelled after the last tensor
            raise MergeCancelled("stopped before publishing")
        place_started = time.perf_counter()
        result = self.layout.publish(job.id, job.attempt, report.output_dir)
        place_seconds = time.perf_counter() - place_started
        artifacts = [Artifact(**entry) for entry in report.files]
        notes = [*job.notes, *report.notes]
        published, publish_seconds = self._publish(job, inputs, result, artifacts, watch, notes)
        finished_at = utcnow()
        final = self._finish(
            job, watch, JobStatus.succeeded, finished_at=finished_at, artifacts=artifacts, published=published,
            progress=watch.latest or job.progress,
            timings=_timings(job, finished_at, resolve_seconds, report, place_seconds, download_seconds,
                             publish_seconds),
            metrics=_metrics(report, arrivals.fetched), notes=notes,
        )
        if final is None:
            log.warning("job %s: attempt %d finished after losing the job; its result is dropped",
                        job.id, job.attempt)
            _remove_quietly(self.layout.result_dir(job.id, job.attempt))
        else:
            log.info("job %s: succeeded in %.2f s", job.id, final.timings.total)
        return final

    def _publish_only(self, job: JobRecord, watch: JobWatch) -> JobRecord | None:
        """A job sharing an earlier job's result (linked at attempt 0 when it was submitted) that still has to
        publish it: the result is linked into this run's own attempt (artifacts are served from the finishing
        attempt's folder) and published; nothing is merged."""
        result = self.layout.share(job.id, 0, job.id, job.attempt)
        published, publish_seconds = self._publish(job, job.inputs, result, job.artifacts, watch, list(job.notes))
        finished_at = utcnow()
        final = self._finish(job, watch, JobStatus.succeeded, finished_at=finished_at, published=published,
                             progress=watch.latest or job.progress,
                             timings=Timings(queued=_seconds(job.created_at, job.started_at or finished_at),
                                             publish=publish_seconds, total=_seconds(job.created_at, finished_at)))
        if final is None:  # superseded: the run that replaced this one links its own
            _remove_quietly(result)
        return final

    def _publish(self, job: JobRecord, inputs: list[PinnedInput], result: Path, artifacts: list[Artifact],
                 watch: JobWatch, notes: list[str]) -> tuple[Published | None, float | None]:
        """Publish the result in place to the request's target, unless an earlier run (or an identical job) did
        already; where it went and the seconds it took, or (None, None) when the request names no target.
        `notes` gains what the job should say about it."""
        spec = job.request.publish
        if spec is None:
            return None, None
        started = time.perf_counter()
        if job.request_digest is None:
            notes.append("the job has no request digest: its publish is identified by the job id, so an identical "
                         "request's publish is not recognised as the same")
        lineage = lineage_of(job, inputs, artifacts)
        total = sum(artifact.size for artifact in artifacts)
        sent = watch.publishing(total)
        try:
            target = self.context.publish_targets.target(spec)
            # One publish per target at a time, across workers: two models raced for one S3 prefix, each
            # overwriting the other's files before one manifest won.
            with held(self.store, f"publish:{spec.to.rstrip('/')}", f"{worker_identity()}:{job.id}:{job.attempt}",
                      self.settings, lambda: _stop_waiting(watch)) as keeper:
                published = target.find(spec, lineage)
                if published is None:
                    guarded = _while_held(sent, keeper, spec.to, self.settings.lease_seconds)
                    published = target.publish(spec, result, lineage,
                                               _paced(guarded, self.settings.publish_bytes_per_second, watch))
                else:  # all of it is there already
                    sent(total)
        except MergeCancelled:
            _remove_quietly(result)
            raise
        except Exception as error:
            raise _PublishFailed(error, artifacts, notes) from error
        log.info("job %s: published to %s (version %s)", job.id, spec.to, published.version)
        return published, time.perf_counter() - started

    def _folder_finder(self, arrivals: Arrivals) -> FolderOf:
        """Where each input's files are: a local folder, checked again (it may have changed since submission);
        a remote one, in the download cache (or on its way there: `arrivals`)."""
        sources = self.context.sources

        def folder_of(pinned: PinnedInput, field: str) -> Path:
            if pinned.scheme == LOCAL_SCHEME:
                local = sources.pin(pinned.ref, field).local_path
                assert local is not None, "a local reference pins to its folder"
                return Path(local)
            return arrivals.folder(pinned)

        return folder_of

    def _stopped(self, job: JobRecord, watch: JobWatch) -> JobRecord | None:
        if watch.lost:
            return None
        if watch.cancel_requested:
            log.info("job %s: cancelled, partial output removed", job.id)
            return self._finish(job, watch, JobStatus.cancelled, progress=watch.latest or job.progress)
        log.info("job %s: worker shutting down; back to the queue", job.id)
        return self._finish(job, watch, JobStatus.queued, worker=None)

    def _fail(self, job: JobRecord, error: Exception, watch: JobWatch, **fields: object) -> JobRecord | None:
        problem = _problem_of(error)
        if problem.status >= 500:
            log.exception("job %s: failed", job.id, exc_info=error)
        else:
            log.info("job %s: failed: %s", job.id, problem.detail)
        return self._finish(job, watch, JobStatus.failed, error=problem.to_dict(),
                            progress=watch.latest or job.progress, **fields)

    def _finish(self, job: JobRecord, watch: JobWatch, status: JobStatus, **fields: object) -> JobRecord | None:
        """Record how the run ended. A store out of reach (restarting, failing over) does not lose the outcome:
        the write is tried again every poll interval, while the watch thread keeps trying to renew the lease,
        until it lands (None if the run was superseded meanwhile) or the worker shuts down (the lease then
        recovers the job)."""
        watch.recording_outcome()
        unreachable_since = None
        while True:
            try:
                final = self.store.finish(job.id, job.attempt, status, **fields)
            except STORE_UNAVAILABLE as error:
                if self.shutdown.is_set():
                    raise
                if unreachable_since is None:
                    unreachable_since = time.monotonic()
                    log.warning("job %s: cannot record that attempt %d %s, the job store is unreachable (%s); "
                                "retrying", job.id, job.attempt, status.value, error)
                self.shutdown.wait(self.settings.poll_seconds)
                continue
            if unreachable_since is not None:
                log.info("job %s: outcome recorded after %.1f s without the store", job.id,
                         time.monotonic() - unreachable_since)
            return final


class _PublishFailed(Exception):
    """Publishing failed after the merge: the job fails with the target's problem and keeps its merged files."""

    def __init__(self, error: Exception, artifacts: list[Artifact], notes: list[str]) -> None:
        super().__init__(str(error))
        self.error, self.artifacts = error, artifacts
        self.notes = [*notes, "merged, but publishing failed: the merged files are kept with the job"]


def _stop_waiting(watch: JobWatch) -> None:
    """A run waiting for its publish target stops as it would mid-publish (cancelled, superseded, shut down)."""
    if watch.should_stop():
        raise MergeCancelled("stopped while waiting for another publish to the same target")


def _while_held(sent: ByteCounter, keeper: LockKeeper, to: str, lease_seconds: float) -> ByteCounter:
    """`sent`, raising a publish-failed problem once the target's publish lock was lost (the store could not be
    told for a lease, and another run took the target): the target stops at its next chunk, leaving nothing a
    reader would trust, rather than interleave its files with the new holder's. The merged files stay with the job
    for a retry."""
    def guarded(count: int) -> None:
        if keeper.lost:
            raise Problem(Problems.PUBLISH_FAILED, f"{TO_FIELD}: {to!r} could not be published: this run lost the "
                          "target's publish lock (its renewals did not reach the job store within the "
                          f"{lease_seconds:g} s lease, and another run took the target)", field=TO_FIELD, ref=to)
        sent(count)

    return guarded


def _paced(sent: ByteCounter, bytes_per_second: int | None, watch: JobWatch) -> ByteCounter:
    """`sent`, held back to `bytes_per_second` (MERGE_PUBLISH_BYTES_PER_SECOND) by waiting in the counter, which
    the target calls as bytes go out; the wait ends early when the run must stop."""
    if bytes_per_second is None:
        return sent
    started, total = time.monotonic(), 0

    def paced(count: int) -> None:
        nonlocal total
        total += count
        ahead = started + total / bytes_per_second - time.monotonic()
        while ahead > 0 and not watch.should_stop():
            time.sleep(min(ahead, POLL_SECONDS))
            ahead = started + total / bytes_per_second - time.monotonic()
        sent(count)

    return paced


def _remove_quietly(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _problem_of(error: Exception) -> Problem:
    """How a failed run is reported: the same problem shape the API uses for its own errors."""
    if isinstance(error, Problem):
        return error
    if isinstance(error, MergeError):
        return merge_problem(error, {})
    if isinstance(error, OSError):  # the runner's own file operations (publishing, cleaning up)
        kind = Problems.STORAGE_FULL if error.errno in DISK_FULL_ERRNOS else Problems.STORAGE_ERROR
        return Problem(kind, storage_detail(error))
    return Problem(Problems.INTERNAL_ERROR, f"{type(error).__name__}: {error}")


def _seconds(start: datetime | None, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds()) if start else 0.0


def _timings(job: JobRecord, finished_at: datetime, resolve: float, report: MergeReport,
             place: float, download: float, publish: float | None) -> Timings:
    engine = report.timings
    after_merge = engine["total"] - engine["plan"] - engine["merge"]
    return Timings(
        queued=_seconds(job.created_at, job.started_at or finished_at),
        download=download if download else None,
        resolve=resolve + engine["plan"],
        merge=engine["merge"],
        write=after_merge + place,
        publish=publish,
        total=_seconds(job.created_at, finished_at),
    )


def _metrics(report: MergeReport, fetched: list[Fetched]) -> Metrics:
    seconds = report.timings["total"]
    return Metrics(
        bytes_downloaded=sum(result.bytes_downloaded for result in fetched) if fetched else None,
        cache_hits=sum(result.cache_hit for result in fetched) if fetched else None,
        peak_rss_bytes=report.peak_rss_bytes,
        bytes_written=report.bytes_written,
        bytes_per_second=report.bytes_written / seconds if seconds > 0 else None,
        tensors_merged=report.tensors_merged,
        tensors_copied=report.tensors_copied,
    )
