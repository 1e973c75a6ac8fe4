"""Everything a route depends on, in one place: the per-process services and the job being addressed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request

from adapter_merge.core.layout import DataLayout
from adapter_merge.core.maintenance import MaintenanceThread
from adapter_merge.core.refs import LocalRootsResolver, Resolver
from adapter_merge.core.settings import Settings
from adapter_merge.core.store import JobRecord, JobStore, open_store
from adapter_merge.service.dispatch import Dispatcher, open_dispatcher
from adapter_merge.service.problems import Problem


@dataclass
class Services:
    """Opened when the app starts (lifespan) and shared by all requests of this process."""

    settings: Settings
    store: JobStore
    layout: DataLayout
    resolver: Resolver
    dispatcher: Dispatcher
    maintenance: MaintenanceThread

    @classmethod
    def open(cls, settings: Settings) -> Services:
        layout = DataLayout(settings.data_dir)
        layout.ensure()
        if not settings.model_roots:
            settings.roots[0].mkdir(parents=True, exist_ok=True)
        store = open_store(settings)
        dispatcher = open_dispatcher(settings)
        maintenance = MaintenanceThread(settings, dispatcher=dispatcher, retention=True)
        maintenance.start()
        return cls(settings, store, layout, LocalRootsResolver(settings.roots), dispatcher, maintenance)

    def close(self) -> None:
        self.maintenance.stop()
        self.store.close()


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_job(job_id: Annotated[str, Path(description="Job id, as returned by POST /merge.")],
            services: ServicesDep) -> JobRecord:
    job = services.store.get(job_id)
    if job is None:
        raise Problem(404, "job-not-found", f"job {job_id!r} does not exist (or was deleted)", title="Unknown job",
                      field="job_id")
    return job


JobDep = Annotated[JobRecord, Depends(get_job)]


def require_json(request: Request) -> None:
    """A body sent as a form or text is a 415 that says so, not a confusing schema error."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not media_type:
        raise Problem(415, "unsupported-media-type", "Content-Type header missing: send the request as "
                      "application/json", title="Unsupported media type", field="Content-Type")
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise Problem(415, "unsupported-media-type", f"Content-Type {media_type!r}: send the request as "
                      "application/json", title="Unsupported media type", field="Content-Type")
