"""Prometheus metrics of the processes that run merges: how long jobs' phases took, by adapter kind, how runs
ended, and leases this worker's reaper found lost.

A run is observed once it has ended: in distributed mode by the Celery pool process that ran it, in embedded
mode by the embedded worker, told by its merge process which job it ran. The processes of one tree write to
prometheus_client's multiprocess folder (`PROMETHEUS_MULTIPROC_DIR`, set up by `adapter-merge serve`/`worker`),
which the long-lived process serves: the API's `/metrics` in embedded mode, `adapter-merge worker
--metrics-port` in distributed mode. Celery starts a pool process per job, each leaving a counter and a
histogram file; the worker folds those of exited processes into files of its own when scraped, so the folder
(and a scrape's work) stays the same size however many jobs ran. Every gauge (jobs by status, queue, live
workers) is computed from the job store when the API is scraped, so no process keeps a live gauge of its own
and a killed process leaves none behind (`multiprocess.mark_process_dead` would have nothing to remove).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

from adapter_merge.core.jobs import JobRecord, JobStatus
from adapter_merge.core.layout import DataLayout
from adapter_merge.core.maintenance import leases_lost_counter

log = logging.getLogger(__name__)
MANIFEST = "merge_manifest.json"
DURATION_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
THROUGHPUT_BUCKETS = (5e6, 1e7, 2.5e7, 5e7, 1e8, 2e8, 4e8, 8e8, 1.6e9)
TRANSFER_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class WorkerMetrics:
    """The metrics a worker records; one per process tree (the Celery app, the embedded worker)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()  # not the global one: a second instance (tests) cannot clash
        self.merge_seconds = Histogram(
            "adapter_merge_merge_duration_seconds", "Reading, merging and writing tensors (timings.merge) of "
            "each succeeded job, by adapter kind (lora, dora, mixed).", ["kind"], buckets=DURATION_BUCKETS,
            registry=self.registry)
        self.merge_throughput = Histogram(
            "adapter_merge_merge_bytes_per_second", "Output bytes over the engine's time (metrics.bytes_per_second) "
            "of each succeeded job, by adapter kind.", ["kind"], buckets=THROUGHPUT_BUCKETS, registry=self.registry)
        self.download_seconds = Histogram(
            "adapter_merge_download_duration_seconds", "Fetching a job's remote inputs (timings.download), for "
            "jobs that downloaded anything.", buckets=TRANSFER_BUCKETS, registry=self.registry)
        self.publish_seconds = Histogram(
            "adapter_merge_publish_duration_seconds", "Writing a job's result to its publish target "
            "(timings.publish).", buckets=TRANSFER_BUCKETS, registry=self.registry)
        self.runs = Counter("adapter_merge_job_runs", "Runs of jobs that ended in this worker, by the job's status "
                            "afterwards (queued: handed back at shutdown).", ["status"], registry=self.registry)
        self.leases_lost = leases_lost_counter(self.registry)

    def observe(self, job: JobRecord | None, layout: DataLayout) -> None:
        """Record a run's outcome. Not a run that was superseded (None: its job belongs to another run now),
        nor a job deleted since (None) or already running again (handed back at shutdown, claimed anew)."""
        if job is None or job.status is JobStatus.running:
            return
        timings = job.timings
        if timings.download is not None:
            self.download_seconds.observe(timings.download)
        if timings.publish is not None:
            self.publish_seconds.observe(timings.publish)
        if job.status is JobStatus.succeeded and timings.merge is not None:
            kind = adapter_kind(layout.result_dir(job.id, job.attempt) / MANIFEST)
            self.merge_seconds.labels(kind).observe(timings.merge)
            if job.metrics.bytes_per_second is not None:
                self.merge_throughput.labels(kind).observe(job.metrics.bytes_per_second)
        # Counted last: a scrape that sees the run also sees every figure it brought.
        self.runs.labels(job.status.value).inc()


def adapter_kind(manifest: Path) -> str:
    """`lora`, `dora` (every adapter is DoRA) or `mixed`, from the adapter configs in the result's manifest;
    `unknown` if the manifest cannot be read (the job was deleted meanwhile)."""
    try:
        adapters = json.loads(manifest.read_text())["adapters"]
    except (OSError, ValueError, KeyError) as error:
        log.warning("cannot tell the adapter kind from %s (%s)", manifest, error)
        return "unknown"
    dora = {bool(adapter["config"].get("use_dora")) for adapter in adapters}
    return "mixed" if len(dora) > 1 else "dora" if True in dora else "lora"


class FoldingCollector:
    """The multiprocess folder's metrics, the files of exited processes first folded into this process's
    `counter_folded.db` and `histogram_folded.db` (every value we keep there is a sum: counters, histogram
    buckets and sums; there are no gauges)."""

    KINDS = ("counter", "histogram")

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._collector = MultiProcessCollector(None, str(folder))
        self._folded: dict[str, MmapedDict] = {}
        self._lock = threading.Lock()  # the metrics server answers from a thread per request

    def collect(self) -> list[Metric]:
        with self._lock:
            self._fold_exited()
            return self._collector.collect()

    def _fold_exited(self) -> None:
        for path in self.folder.glob("*.db"):
            kind, _, pid = path.stem.partition("_")
            if kind not in self.KINDS or not pid.isdigit() or psutil.pid_exists(int(pid)):
                continue
            folded = self._folded.get(kind) or self._folded.setdefault(
                kind, MmapedDict(str(self.folder / f"{kind}_folded.db")))
            for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(str(path)):
                folded.write_value(key, folded.read_value(key)[0] + value, timestamp)
            path.unlink()


def serve_metrics(host: str, port: int) -> None:
    """Serve the metrics of this process and of every process of its tree on http://host:port/metrics,
    from a thread (`adapter-merge worker --metrics-port`)."""
    registry = CollectorRegistry()
    registry.register(FoldingCollector(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])))
    start_http_server(port, addr=host, registry=registry)
