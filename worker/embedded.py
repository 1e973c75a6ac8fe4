"""The embedded worker: `adapter-merge serve` starts this process when no Redis is configured.

Each job runs in a child process of its own that exits afterwards, as in Celery's prefork pool with one task
per child: the memory a merge used goes back to the system, peak RSS is measured per job, a crash in the
merge cannot take the worker down, and the job's `worker` is the process that ran it (as with Celery). The
child is forked ahead of its job, as soon as the previous one has exited, and imports the engine (and torch,
about a second) while the worker waits for work, so a job starts without that cost. The worker waits on the
job store's bell (`core.dispatch`: the API rings it on every submission), and looks at the store every
MERGE_POLL_SECONDS as well; on a queued job it tells the ready child to claim the oldest one. On SIGTERM (or
when the API process that started it disappears) the running merge stops at the next tensor and its job
goes back to the queue, so a restart picks it up again.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

from adapter_merge.core.context import JobContext
from adapter_merge.core.dispatch import BELL_NAME, BellListener
from adapter_merge.core.jobs import JobStatus
from adapter_merge.core.logs import job_logging
from adapter_merge.core.process import start_process
from adapter_merge.worker.metrics import WorkerMetrics
from adapter_merge.worker.presence import Presence
from adapter_merge.worker.runner import JobRunner, worker_identity

log = logging.getLogger("adapter_merge.worker.embedded")


@dataclass
class MergeProcess:
    """A forked merge process, getting ready or ready: a byte on `go` tells it to claim the oldest queued job
    (closing `go`, to exit), and it writes the id of the job it ran to `ran`."""

    pid: int
    go: int
    ran: int


class _Dismissed(Exception):
    """A merge process told to stop before it had a job."""


class EmbeddedWorker:
    def __init__(self, context: JobContext, parent_pid: int | None) -> None:
        self.context = context
        self.settings = context.settings
        self.parent_pid = parent_pid
        self.stopping = threading.Event()
        self.child: int | None = None
        self.metrics = WorkerMetrics()
        self.presence = Presence(context.store, self.settings, worker_identity())
        self.bell = BellListener(context.layout.root / BELL_NAME)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()
        self.bell.interrupt()
        if self.child is not None:
            os.kill(self.child, signal.SIGTERM)

    def parent_gone(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def run(self) -> int:
        store = self.context.store
        log.info("embedded worker %s waiting for jobs in %s", self.presence.identity, self.settings.data_dir)
        ready: MergeProcess | None = None
        try:
            while not self.stopping.is_set():
                if self.parent_gone():
                    log.warning("the API process is gone; stopping")
                    break
                self.presence.beat()
                if ready is None:
                    ready = self.start_merge_process()
                if not store.list([JobStatus.queued], limit=1)[1]:
                    self.bell.wait(self.settings.poll_seconds)
                    continue
                process, ready = ready, None
                self.run_job(process)
        finally:
            if ready is not None:
                self.dismiss(ready)
            self.bell.close()
            self.presence.withdraw()
        return 0

    def start_merge_process(self) -> MergeProcess:
        """Fork the process for the next job; it gets ready while this one goes on waiting for work."""
        go_read, go_write = os.pipe()
        ran_read, ran_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            for fd in (go_write, ran_read, self.bell.fd):
                os.close(fd)
            os._exit(_merge_process_main(self.context, go_read, ran_write))
        os.close(go_read)
        os.close(ran_write)
        return MergeProcess(pid, go_write, ran_read)

    def dismiss(self, process: MergeProcess) -> None:
        """A merge process that got no job: closing `go` ends it (once it is ready, if it is still loading)."""
        os.close(process.go)
        os.close(process.ran)
        os.waitpid(process.pid, 0)

    def run_job(self, process: MergeProcess) -> None:
        """Have the merge process run the oldest queued job and wait for it; the run it reports back (its job's
        id, through a pipe) is observed here, by this long-lived process, so a merge process leaves no metrics
        files behind."""
        self.child = process.pid
        try:
            with contextlib.suppress(BrokenPipeError):  # it died getting ready: its exit status says how
                os.write(process.go, b"\0")
            while True:
                done, status = os.waitpid(process.pid, os.WNOHANG)
                if done:
                    break
                if self.parent_gone() and not self.stopping.is_set():
                    self.on_signal(signal.SIGTERM, None)
                self.presence.beat()
                time.sleep(0.1)
        finally:
            self.child = None
            os.close(process.go)
        with os.fdopen(process.ran, "rb") as pipe:
            ran = pipe.read().decode()
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            log.error("merge process %d ended with %s; the lease reaper will recover its job, if it had one",
                      process.pid, f"signal {-code}" if code < 0 else f"exit code {code}")
            self.stopping.wait(self.settings.poll_seconds)  # one that fails before claiming must not spin
        elif ran:
            self.metrics.observe(self.context.store.get(ran), self.context.layout)


def _merge_process_main(context: JobContext, go: int, ran: int) -> int:
    """The forked merge process: gets ready (engine and torch imported, runner built), waits for the worker's
    go, claims the oldest queued job (none if another worker was quicker) and runs it, then writes the job's
    id to the pipe `ran` if its run was still the job's at the end. The SQLite store opens a connection per
    call, so sharing it with the parent is safe."""
    waiting = True
    try:
        runner = JobRunner(context)

        def shutdown(signum: int, frame: FrameType | None) -> None:
            if waiting:
                raise _Dismissed
            runner.shutdown.set()

        signal.signal(signal.SIGTERM, shutdown)
        signal.signal(signal.SIGINT, shutdown)
        runner.preload()
        if not os.read(go, 1):  # the worker stops, or is gone
            return 0
        waiting = False
        job = None if runner.shutdown.is_set() else \
            context.store.claim_next(worker_identity(), context.settings.lease_seconds)
        if job is not None:
            with job_logging(job.id):
                final = runner.execute(job)
            if final is not None:
                os.write(ran, final.id.encode())
        return 0
    except _Dismissed:
        return 0
    except BaseException:
        log.exception("merge process failed")
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adapter_merge.worker.embedded",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the API server) exits")
    args = parser.parse_args(argv)
    context = JobContext.open(start_process("adapter-merge embedded worker"))
    worker = EmbeddedWorker(context, args.parent_pid)
    signal.signal(signal.SIGTERM, worker.on_signal)
    signal.signal(signal.SIGINT, worker.on_signal)
    try:
        return worker.run()
    finally:
        context.close()


if __name__ == "__main__":
    raise SystemExit(main())
