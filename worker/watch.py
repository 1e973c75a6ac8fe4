"""The companion thread of a running merge: renews the job's lease, publishes progress (downloading, merging,
publishing), and notices when the run must stop (cancel requested, worker shutting down, or the lease lost to a
rerun elsewhere).

The engine only polls `should_stop()` between tensors and calls `progress()` after each; both are cheap
memory reads here, and all store traffic happens on this thread at a steady pace.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType

from adapter_merge.core.jobs import JobRecord, Progress
from adapter_merge.core.settings import Settings
from adapter_merge.core.store import JobStore
from adapter_merge.worker.engine import MergeCancelled
from adapter_merge.worker.engine import Progress as MergeProgress

log = logging.getLogger(__name__)


class JobWatch:
    def __init__(self, store: JobStore, job: JobRecord, settings: Settings, shutdown: threading.Event) -> None:
        self.store, self.job, self.settings, self.shutdown = store, job, settings, shutdown
        self.cancel_requested = job.cancel_requested
        self.lost = False
        self._recording = False
        self._sent: Progress | None = None
        self._merged: MergeProgress | None = None
        self._download: list[int] | None = None
        """Bytes arrived and bytes to fetch, while the run downloads inputs."""
        self._upload: list[int] | None = None
        """Bytes sent and bytes to send, while the run publishes its result."""
        self._shown = threading.Lock()
        self._done = threading.Event()
        # In the runner's context, so its lines name the job as the runner's own do (core/logs.py).
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                        name=f"watch-{job.id}", daemon=True)

    def __enter__(self) -> JobWatch:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._done.set()
        self._thread.join()

    # -- called from the merge thread --------------------------------------------------------------------

    def progress(self, progress: MergeProgress) -> None:
        """The engine's report after a tensor."""
        with self._shown:
            self._merged = progress

    def downloading(self, bytes_total: int) -> Callable[[int], None]:
        """Start showing a download of `bytes_total` bytes; returns what to tell as bytes arrive (from any
        thread). The merge starts on the first inputs in while the rest download: until the last byte, the job
        shows the download, with the tensors merged meanwhile; then the merge."""
        with self._shown:
            self._download = [0, bytes_total]
        return self._counter(self._download)

    def publishing(self, bytes_total: int) -> Callable[[int], None]:
        """Start showing the upload of the result (`bytes_total` bytes) to its publish target; returns what to
        tell as bytes go out, which raises `MergeCancelled` once the run must stop (cancelled, worker shutting
        down, job lost), so that the target stops uploading."""
        with self._shown:
            self._upload = [0, bytes_total]
        count = self._counter(self._upload)

        def sent(bytes_sent: int) -> None:
            count(bytes_sent)
            if self.should_stop():
                raise MergeCancelled("stopped while publishing")

        return sent

    def _counter(self, done_and_total: list[int]) -> Callable[[int], None]:
        """Adds to `done_and_total[0]`: a sum under a lock, called for every chunk of a transfer, where building
        the job's `Progress` each time cost a download a tenth of its thread's time."""
        def counted(count: int) -> None:
            with self._shown:
                done_and_total[0] += count

        return counted

    def should_stop(self) -> bool:
        return self.cancel_requested or self.lost or self.shutdown.is_set()

    def recording_outcome(self) -> None:
        """The runner is about to record how the run ended (the lease is still renewed meanwhile): a record
        that stops showing the run as running is that outcome landing, not the job lost to another run."""
        self._recording = True

    @property
    def latest(self) -> Progress | None:
        """The run's progress as the job shows it, built from the counts when asked (at the store's pace)."""
        with self._shown:
            merged, download, upload = self._merged, self._download, self._upload
            tensors_total = merged.tensors_total if merged else self.job.progress.tensors_total
            if upload is not None:
                return Progress(phase="publishing", bytes_done=upload[0], bytes_total=upload[1],
                                tensors_total=self.job.progress.tensors_total)
            if download is not None and (download[0] < download[1] or merged is None):
                return Progress(phase="downloading", bytes_done=download[0], bytes_total=download[1],
                                tensors_done=merged.tensors_done if merged else 0, tensors_total=tensors_total)
            if merged is not None:
                return Progress(phase="merging", tensors_done=merged.tensors_done, tensors_total=tensors_total,
                                bytes_done=merged.bytes_done, bytes_total=merged.bytes_total)
            return None

    # -- the thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        next_renewal = time.monotonic() + self.settings.heartbeat_seconds
        failing = False
        while not self._done.wait(self.settings.poll_seconds):
            # After a failure the first write that lands renews the lease, whatever else it carries: the store
            # may be back from an outage longer than the lease (reapers then wait a lease for it: README).
            renew = failing or time.monotonic() >= next_renewal
            try:
                self._beat(renew)
            except Exception:  # keep beating, every poll interval, until the store answers again
                if not failing:
                    log.exception("job %s: heartbeat failed; retrying", self.job.id)
                failing = True
                continue
            if failing:
                log.info("job %s: heartbeat works again", self.job.id)
            failing = False
            if renew:
                next_renewal = time.monotonic() + self.settings.heartbeat_seconds

    def _beat(self, renew: bool) -> None:
        latest = self.latest
        progress = latest if latest is not None and latest != self._sent else None
        if renew or progress is not None:
            lease = self.settings.lease_seconds if renew else None
            record = self.store.heartbeat(self.job.id, self.job.attempt, lease, progress)
        else:
            record = self.store.get(self.job.id)
            if record is not None and (record.attempt != self.job.attempt or record.status != "running"):
                record = None
        if record is None:
            if not self.lost and not self._recording:
                log.warning("job %s: attempt %d no longer owns the job; stopping", self.job.id, self.job.attempt)
            self.lost = True
            return
        self._sent = latest if progress is not None else self._sent
        if record.cancel_requested and not self.cancel_requested:
            log.info("job %s: cancel requested", self.job.id)
            self.cancel_requested = True

