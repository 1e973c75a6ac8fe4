"""Preflight (resolving references, reading headers and configs, planning) in worker processes with a time
limit, so that a hostile input cannot stall the API: parsing a large JSON header or matching a pattern holds
Python's GIL, which in a thread would stop the event loop (and `/healthz`) too. A preflight that overruns
its limit has its processes killed and gets a 503; the pool starts again for the next request.
"""

from __future__ import annotations

import logging
import multiprocessing
import tempfile
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter_merge.core.digest import request_digest
from adapter_merge.core.preflight import preflight
from adapter_merge.core.problems import Problem, Problems
from adapter_merge.core.request import MergeRequest
from adapter_merge.core.settings import Settings
from adapter_merge.core.sources.base import PinnedInput
from adapter_merge.core.sources.registry import Sources

log = logging.getLogger(__name__)
RETRY_SECONDS = 5


@dataclass(frozen=True)
class Checked:
    """What a passed preflight hands the job: the plan's summary, every input as pinned, and the request
    digest (`core.digest`; taken here, where the local folders' stat calls cannot stall the event loop)."""

    summary: dict[str, Any]
    inputs: list[PinnedInput]
    digest: str


_sources: Sources | None = None
"""A pool process's sources, built once when it starts (`_start`): listing the installed source plugins reads every
package's metadata, a third of a preflight's time if done per request, and sources keep their clients."""


def _start(settings: Settings) -> None:
    """Runs once in each new pool process."""
    global _sources
    _sources = Sources(settings)


def _check(request: dict[str, Any], tenant: str) -> tuple[str, Any]:
    """Runs in a pool process; answers with plain data, since exceptions with extra fields do not pickle."""
    assert _sources is not None, "set when the pool process started"
    try:
        with tempfile.TemporaryDirectory(prefix="preflight-") as scratch:
            merge_request = MergeRequest.model_validate(request)
            resolved, plan = preflight(merge_request, _sources, Path(scratch), tenant)
    except Problem as problem:
        return "problem", (problem.kind.slug, problem.detail, problem.members, problem.retry_after)
    digest = request_digest(merge_request, resolved.inputs)
    return "ok", (plan.summary(), [pinned.model_dump(mode="json") for pinned in resolved.inputs], digest)


class PreflightPool:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:  # started on first use: a server that takes no merge needs none
                self._executor = ProcessPoolExecutor(self.settings.preflight_workers,
                                                     mp_context=multiprocessing.get_context("spawn"),
                                                     initializer=_start, initargs=(self.settings,))
            return self._executor

    def check(self, request: MergeRequest, tenant: str) -> Checked:
        """The plan's summary and the pinned inputs; raises the preflight's `Problem`, or a 503 when it
        overran its time."""
        pool = self._pool()
        future = pool.submit(_check, request.model_dump(mode="json"), tenant)
        try:
            outcome, value = future.result(timeout=self.settings.preflight_seconds)
        except FutureTimeout:
            self._kill(pool)
            raise Problem(Problems.PREFLIGHT_TIMEOUT, f"checking the inputs took longer than "
                          f"{self.settings.preflight_seconds:g} s (MERGE_PREFLIGHT_SECONDS)",
                          retry_after=RETRY_SECONDS) from None
        except BrokenProcessPool:
            self._kill(pool)
            raise Problem(Problems.PREFLIGHT_TIMEOUT, "checking the inputs failed (its process ended); try again",
                          retry_after=RETRY_SECONDS) from None
        if outcome == "problem":
            slug, detail, members, retry_after = value
            raise Problem(Problems.by_slug(slug), detail, retry_after=retry_after, **members)
        summary, inputs, digest = value
        return Checked(summary, [PinnedInput.model_validate(pinned) for pinned in inputs], digest)

    def _kill(self, pool: ProcessPoolExecutor) -> None:
        """End a pool whose work overran: its processes are killed, the next request starts a new pool."""
        with self._lock:
            if self._executor is pool:
                self._executor = None
        for process in list((getattr(pool, "_processes", None) or {}).values()):  # no public kill exists
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        log.warning("preflight pool restarted after a preflight overran or crashed")

    def close(self) -> None:
        with self._lock:
            pool, self._executor = self._executor, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
