"""The embedded worker: `adapter-merge serve` starts this process when no Redis is configured.

When the local store holds a queued job it forks a child process that claims the oldest one and runs it, as
Celery's prefork pool does with one task per child: the memory a merge used goes back to the system when
the child exits, peak RSS is measured per job, a crash in the merge cannot take the worker down, and the
job's `worker` is the process that ran it (as with Celery). On SIGTERM (or when the API
process that started it disappears) the running merge stops at the next tensor and its job goes back to
the queue, so a restart picks it up again.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType

from adapter_merge.core.context import JobContext
from adapter_merge.core.jobs import JobStatus
from adapter_merge.core.logs import job_logging
from adapter_merge.core.process import start_process
from adapter_merge.worker.metrics import WorkerMetrics
from adapter_merge.worker.presence import Presence
from adapter_merge.worker.runner import JobRunner, worker_identity

log = logging.getLogger("adapter_merge.worker.embedded")


class EmbeddedWorker:
    def __init__(self, context: JobContext, parent_pid: int | None) -> None:
        self.context = context
        self.settings = context.settings
        self.parent_pid = parent_pid
        self.stopping = threading.Event()
        self.child: int | None = None
        self.metrics = WorkerMetrics()
        self.presence = Presence(context.store, self.settings, worker_identity())

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()
        if self.child is not None:
            os.kill(self.child, signal.SIGTERM)

    def parent_gone(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def run(self) -> int:
        store = self.context.store
        log.info("embedded worker %s polling %s", self.presence.identity, self.settings.data_dir)
        try:
            while not self.stopping.is_set():
                if self.parent_gone():
                    log.warning("the API process is gone; stopping")
                    break
                self.presence.beat()
                if not store.list([JobStatus.queued], limit=1)[1]:
                    self.stopping.wait(self.settings.poll_seconds)
                    continue
                self.run_in_child()
        finally:
            self.presence.withdraw()
        return 0

    def run_in_child(self) -> None:
        """Fork a merge process and wait for it; the run it reports back (its job's id, through a pipe) is
        observed here, by this long-lived process, so a merge process leaves no metrics files behind."""
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(reader)
            os._exit(_child_main(self.context, writer))
        os.close(writer)
        self.child = pid
        try:
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if self.parent_gone() and not self.stopping.is_set():
                    self.on_signal(signal.SIGTERM, None)
                self.presence.beat()
                time.sleep(0.1)
        finally:
            self.child = None
        with os.fdopen(reader, "rb") as pipe:
            ran = pipe.read().decode()
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            log.error("merge process %d ended with %s; the lease reaper will recover its job, if it had one", pid,
                      f"signal {-code}" if code < 0 else f"exit code {code}")
            self.stopping.wait(self.settings.poll_seconds)  # one that fails before claiming must not spin
        elif ran:
            self.metrics.observe(self.context.store.get(ran), self.context.layout)


def _child_main(context: JobContext, ran: int) -> int:
    """The forked merge process: claims the oldest queued job (none if another worker was quicker) and runs it,
    then writes the job's id to the pipe `ran` if its run was still the job's at the end. The SQLite store
    opens a connection per call, so sharing it with the parent is safe."""
    try:
        runner = JobRunner(context)

        def shutdown(signum: int, frame: FrameType | None) -> None:
            runner.shutdown.set()

        signal.signal(signal.SIGTERM, shutdown)
        signal.signal(signal.SIGINT, shutdown)
        job = None if runner.shutdown.is_set() else \
            context.store.claim_next(worker_identity(), context.settings.lease_seconds)
        if job is not None:
            with job_logging(job.id):
                final = runner.execute(job)
            if final is not None:
                os.write(ran, final.id.encode())
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
