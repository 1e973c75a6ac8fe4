"""Which target a `publish.to` belongs to, and whether this deployment (and this tenant) may publish there.

Targets are looked up by scheme like sources (`s3://`, `models:/`, `hf://`), built once per process on first
use (each keeps its registry client); a plugin adds one through the `adapter_merge.publish` entry-point group
(`name = "package.module:factory"`, the factory taking the settings). A target obeys the same allow-list as a
source: MERGE_ALLOWED_SOURCES and MERGE_TENANT_ALLOWED_SOURCES, matched by `Sources` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

from adapter_merge.core.problems import Problems
from adapter_merge.core.publish.base import TO_FIELD, PublishTarget
from adapter_merge.core.refs import BadReference
from adapter_merge.core.request import PublishSpec
from adapter_merge.core.settings import Settings
from adapter_merge.core.sources.registry import LOCAL_SCHEME, Sources, scheme_form, scheme_of

ENTRY_POINT_GROUP = "adapter_merge.publish"

TargetFactory = Callable[[Settings], PublishTarget]


def _builtin_factories() -> dict[str, TargetFactory]:
    """Imported on first use: each pulls in its registry's client library."""

    def s3(settings: Settings) -> PublishTarget:
        from adapter_merge.core.publish.s3 import S3Target

        return S3Target(settings)

    def mlflow(settings: Settings) -> PublishTarget:
        from adapter_merge.core.publish.mlflow import MlflowTarget

        return MlflowTarget(settings)

    def hub(settings: Settings) -> PublishTarget:
        from adapter_merge.core.publish.hub import HubTarget

        return HubTarget(settings)

    return {"s3": s3, "models": mlflow, "hf": hub}


class PublishTargets:
    """Every publish target this process knows, built once per process (targets keep their clients)."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self.factories = _builtin_factories()
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            self.factories.setdefault(entry.name, entry.load())
        self._built: dict[str, PublishTarget] = {}

    def target(self, spec: PublishSpec) -> PublishTarget:
        scheme = scheme_of(spec.to)
        if scheme not in self._built:
            self._built[scheme] = self.factories[scheme](self.sources.settings)
        return self._built[scheme]

    def check(self, spec: PublishSpec, tenant: str | None) -> None:
        """At submission, without a network call: 422 naming `publish.to` for an unknown scheme or a target this
        deployment, or this tenant, may not publish to; then the target's own checks of the URI and options."""
        scheme = scheme_of(spec.to)
        if scheme == LOCAL_SCHEME or scheme not in self.factories:
            known = ", ".join(sorted(scheme_form(name) for name in self.factories))
            raise BadReference(TO_FIELD, spec.to, Problems.REFERENCE_INVALID, f"is not a publish target (known: "
                               f"{known})")
        self.sources.check_allowed(spec.to, TO_FIELD, tenant, "publish to")
        self.target(spec).check(spec, TO_FIELD)
