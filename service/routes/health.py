"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from adapter_merge.core.layout import DataLayout
from adapter_merge.core.problems import Problem, Problems
from adapter_merge.service.deps import ServicesDep
from adapter_merge.service.schemas import Health, Readiness, problem_responses

router = APIRouter(tags=["health"])
READY_RETRY_SECONDS = 5


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process answers. Runs on the event loop itself, not in the thread pool, so it answers at once
    even while every worker thread is busy (preflights, downloads)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses=problem_responses(503))
def readyz(services: ServicesDep) -> Readiness:
    """The job store and the broker answer and the data dir is writable; 503 (naming the failing check)
    otherwise."""
    checks: dict[str, str] = {}
    for name, probe in (("store", services.context.store.ping), ("broker", services.dispatcher.ping)):
        try:
            probe()
            checks[name] = "ok"
        except Exception as error:
            checks[name] = f"{type(error).__name__}: {error}"
    # Less than MERGE_MIN_FREE_BYTES free is not ready either (new merges would be refused with 507).
    checks["data_dir"] = _data_dir_check(services.context.layout, services.context.settings.min_free_bytes)
    mode = "distributed" if services.context.settings.distributed else "embedded"
    failing = [name for name, result in checks.items() if result != "ok"]
    if failing:
        raise Problem(Problems.NOT_READY, f"not ready: {', '.join(f'{n} ({checks[n]})' for n in failing)}",
                      retry_after=READY_RETRY_SECONDS, mode=mode, checks=checks)
    return Readiness(status="ready", mode=mode, checks=checks)


def _data_dir_check(layout: DataLayout, min_free_bytes: int) -> str:
    try:
        free = layout.free_bytes()
    except OSError as error:
        return f"the data dir cannot be examined ({error.strerror})"
    if free < min_free_bytes:
        return f"{free} bytes free, less than the {min_free_bytes} MERGE_MIN_FREE_BYTES asks for"
    return "ok" if layout.is_writable() else "the data dir is not writable"
