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
import select
import signal
import threading
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


IDLE = b"idle"
"""A merge process's answer to a go when it found no job to claim (another worker's was quicker): it stays ready."""


@dataclass
class MergeProcess:
    """A forked merge process, getting ready or ready: a byte on `go` tells it to claim the oldest queued job
    (closing `go`, to exit). It answers on `ran`: IDLE if there was none to claim, else, once the job has run,
    the job's id (nothing if the run was superseded) and it exits."""

    pid: int
    go: int
    ran: int


class _Dismissed(Exception):
    """A merge process told to stop while it had no job."""


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
                ready = self.offer_job(ready)
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
        """A merge process without a job: closing `go` ends it (once it is ready, if it is still loading)."""
        os.close(process.go)
        os.close(process.ran)
        os.waitpid(process.pid, 0)

    def offer_job(self, process: MergeProcess) -> MergeProcess | None:
        """Have the merge process claim the oldest queued job and wait until it has run it; the run it reports
        back (its job's id) is observed here, by this long-lived process, so a merge process leaves no metrics
        files behind. Returns the process if it found no job to claim (it is still ready), else None: it has
        exited."""
        self.child = process.pid
        try:
            with contextlib.suppress(BrokenPipeError):  # it died getting ready: its exit status says how
                os.write(process.go, b"\0")
            answer = self._answer(process)
            if answer == IDLE:
                return process
            _, status = os.waitpid(process.pid, 0)  # it has answered for good: it is exiting
        finally:
            self.child = None
        os.close(process.go)
        os.close(process.ran)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            log.error("merge process %d ended with %s; the lease reaper will recover its job, if it had one",
                      process.pid, f"signal {-code}" if code < 0 else f"exit code {code}")
            self.stopping.wait(self.settings.poll_seconds)  # one that fails before claiming must not spin
        elif answer:
            self.metrics.observe(self.context.store.get(answer.decode()), self.context.layout)
        return None

    def _answer(self, process: MergeProcess) -> bytes:
        """What the merge process answers to a go: IDLE, or all it writes until it exits (a job's id, or nothing),
        while this process goes on beating and watching for its parent."""
        answer = b""
        while True:
            readable, _, _ = select.select([process.ran], [], [], 0.1)
            if readable:
                data = os.read(process.ran, 4096)
                if not data:
                    return answer
                answer += data
                if answer == IDLE:
                    return answer
            if self.parent_gone() and not self.stopping.is_set():
                self.on_signal(signal.SIGTERM, None)
            self.presence.beat()


def _merge_process_main(context: JobContext, go: int, ran: int) -> int:
    """The forked merge process: gets ready (engine and torch imported, runner built), then at each of the
    worker's go claims the oldest queued job: with none (another worker's process was quicker) it answers IDLE
    and waits for the next go; with one it runs it, writes the job's id to `ran` if its run was still the job's
    at the end, and exits. The SQLite store opens a connection per call, so sharing it with the parent is safe."""
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
        while True:
            if not os.read(go, 1):  # the worker stops, or is gone
                return 0
            waiting = False
            if runner.shutdown.is_set():
                return 0
            job = context.store.claim_next(worker_identity(), context.settings.lease_seconds)
            if job is not None:
                break
            waiting = True
            os.write(ran, IDLE)
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
