"""The API's Prometheus metrics: HTTP requests by route template, the job store's state (computed when
scraped), leases the API's reaper recovered, and `GET /metrics` serving them.

In embedded mode the same `/metrics` also carries the job histograms of the local worker processes: every
process of one `adapter-merge serve` writes to the multiprocess folder the command set up
(`PROMETHEUS_MULTIPROC_DIR`, see `cli/metrics_dir.py`), and a scrape sums them. Celery workers serve their
own (`adapter-merge worker --metrics-port`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapter_merge.core.access import Role
from adapter_merge.core.jobs import JobStatus
from adapter_merge.core.maintenance import leases_lost_counter
from adapter_merge.core.store import STORE_UNAVAILABLE, JobStore
from adapter_merge.service.auth import forbid_unless
from adapter_merge.service.deps import ServicesDep

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"
"""The route label of requests no route matched (any path: labelling them by path would be unbounded)."""


class ApiMetrics:
    """The metrics an API process records; one per app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()  # not the global one: the tests build many apps in one process
        self.requests = Counter("adapter_merge_http_requests", "HTTP requests answered, by method, route template "
                                "and status.", ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("adapter_merge_http_request_duration_seconds", "Time from a request's arrival "
                                 "until its response was sent, by method and route template.", ["method", "route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.leases_lost = leases_lost_counter(self.registry)

    def exposition(self, store: JobStore) -> bytes:
        """The text a scrape gets: every process of this tree (or this process alone, when not started by the
        CLI) plus the store's state."""
        registry = CollectorRegistry()
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            MultiProcessCollector(registry)
        else:
            registry.register(self.registry)
        registry.register(StoreCollector(store))
        return generate_latest(registry)


class HttpMetrics:
    """ASGI middleware counting every response by route template (`/jobs/{job_id}`, not the path) and timing it
    until its last byte is sent. A pure ASGI wrapper: streamed downloads pass through untouched."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            method = scope["method"] if scope["method"] in METHODS else "other"
            route = getattr(scope.get("route"), "path", None) or UNMATCHED  # set by the router that matched
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)


class StoreCollector:
    """Gauges read from the job store at scrape time: counts and the queue's head, never a scan of the jobs.
    With several API processes each reports the same values (aggregate them with max, not sum)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("adapter_merge_store_up", "1 when the job store answered this scrape.")
        try:
            families = list(self._families())
        except STORE_UNAVAILABLE:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("adapter_merge_jobs", "Jobs in the store by status (finished ones until "
                                 "retention deletes them).", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], self.store.list([status], limit=1)[1])
        yield jobs
        head, queued = self.store.list([JobStatus.queued], limit=1, oldest_first=True)
        yield GaugeMetricFamily("adapter_merge_queue_depth", "Jobs waiting for a worker.", value=queued)
        age = max(0.0, self.store.now() - head[0].created_at.timestamp()) if head else 0.0
        yield GaugeMetricFamily("adapter_merge_queue_oldest_age_seconds", "Time since the oldest queued job was "
                                "submitted (0 when none waits).", value=age)
        yield GaugeMetricFamily("adapter_merge_workers_live", "Worker processes whose heartbeat is current in "
                                "the store.", value=len(self.store.live_workers()))


_bearer = HTTPBearer(auto_error=False)


def may_scrape(services: ServicesDep,
               credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """An admin's token, unless MERGE_METRICS_PUBLIC: the metrics describe every tenant's jobs."""
    if services.context.settings.metrics_public:
        return
    principal = services.authenticator.authenticate(credentials.credentials if credentials else None)
    forbid_unless(principal, Role.admin)


router = APIRouter()


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(may_scrape)])
def metrics(request: Request, services: ServicesDep) -> Response:
    """Prometheus' text format (not part of the JSON API, so not in its schema)."""
    body = request.app.state.metrics.exposition(services.context.store)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
