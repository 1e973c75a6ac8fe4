"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Protocol

from fastapi import APIRouter, Request

from adapter_merge.core.layout import DataLayout
from adapter_merge.core.problems import Problem, Problems
from adapter_merge.core.settings import Settings
from adapter_merge.core.store import JobStore
from adapter_merge.service.deps import ServicesDep
from adapter_merge.service.schemas import Health, Readiness, problem_responses

router = APIRouter(tags=["health"])
READY_RETRY_SECONDS = 5


class LocalWorkers(Protocol):
    """The embedded mode's worker processes, as `adapter-merge serve` supervises them."""

    def problem(self) -> str | None:
        """Why they cannot run jobs now (one has died and is being restarted); None when they can."""


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process answers. Runs on the event loop itself, not in the thread pool, so it answers at once
    even while every worker thread is busy (preflights, downloads)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses=problem_responses(503))
def readyz(request: Request, services: ServicesDep) -> Readiness:
    """The job store and the broker answer, the data dir is writable and a worker is there to run jobs; 503
    (naming the failing check) otherwise."""
    checks: dict[str, str] = {}
    for name, probe in (("store", services.context.store.ping), ("broker", services.dispatcher.ping)):
        try:
            probe()
            checks[name] = "ok"
        except Exception as error:
            checks[name] = f"{type(error).__name__}: {error}"
    # Less than MERGE_MIN_FREE_BYTES free is not ready either (new merges would be refused with 507).
    checks["data_dir"] = _data_dir_check(services.context.layout, services.context.settings.min_free_bytes)
    local_workers: LocalWorkers | None = request.app.state.local_workers
    if services.context.settings.distributed:
        checks["workers"] = _workers_check(services.context.store, services.context.settings)
    elif local_workers is not None:  # an app not run by `adapter-merge serve` (tests in process) has none
        checks["workers"] = local_workers.problem() or "ok"
    mode = "distributed" if services.context.settings.distributed else "embedded"
    failing = [name for name, result in checks.items() if result != "ok"]
    if failing:
        raise Problem(Problems.NOT_READY, f"not ready: {', '.join(f'{n} ({checks[n]})' for n in failing)}",
                      retry_after=READY_RETRY_SECONDS, mode=mode, checks=checks)
    return Readiness(status="ready", mode=mode, checks=checks)


def _workers_check(store: JobStore, settings: Settings) -> str:
    """Distributed mode: some worker's heartbeat in the store is current (a worker records one every
    MERGE_HEARTBEAT_SECONDS, valid for MERGE_LEASE_SECONDS)."""
    try:
        live = store.live_workers()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    if live:
        return "ok"
    return (f"no worker has been seen for {settings.lease_seconds:g} s: start `adapter-merge worker` (or check "
            "that the workers reach the job store)")


def _data_dir_check(layout: DataLayout, min_free_bytes: int) -> str:
    try:
        free = layout.free_bytes()
    except OSError as error:
        return f"the data dir cannot be examined ({error.strerror})"
    if free < min_free_bytes:
        return f"{free} bytes free, less than the {min_free_bytes} MERGE_MIN_FREE_BYTES asks for"
    return "ok" if layout.is_writable() else "the data dir is not writable"
