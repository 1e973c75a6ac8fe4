"""Which source a reference belongs to, and whether this deployment may fetch from it.

A reference names its source by its scheme (`hf://`, `s3://`, `models:/`, `file://`; a bare path is a local
folder). Built-in sources are registered here; a plugin adds one through the `adapter_merge.sources`
entry-point group (`name = "package.module:factory"`, the factory taking the settings), so an internal
registry needs no change to the service. Remote sources are off until `MERGE_ALLOWED_SOURCES` allows them.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable
from importlib.metadata import entry_points

from adapter_merge.core.problems import Problems
from adapter_merge.core.refs import BadReference
from adapter_merge.core.settings import Settings
from adapter_merge.core.sources.base import PinnedInput, RemoteSource, Source

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "adapter_merge.sources"
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):/")
LOCAL_SCHEME = "file"
"""The scheme of local folders, read in place (bare paths and file:// URIs)."""

SourceFactory = Callable[[Settings], Source]


def scheme_of(ref: str) -> str:
    """`hf://org/x` -> hf, `models:/x/1` -> models, `/srv/models/x` or `x` -> file."""
    match = _SCHEME.match(ref)
    return match.group(1).lower() if match else LOCAL_SCHEME


def _builtin_factories() -> dict[str, SourceFactory]:
    """Imported on first use: each pulls in its registry's client library."""

    def local(settings: Settings) -> Source:
        from adapter_merge.core.sources.local import LocalSource

        return LocalSource(settings.roots)

    def hub(settings: Settings) -> Source:
        from adapter_merge.core.sources.hub import HubSource

        return HubSource(settings)

    def s3(settings: Settings) -> Source:
        from adapter_merge.core.sources.s3 import S3Source

        return S3Source(settings)

    def mlflow(settings: Settings) -> Source:
        from adapter_merge.core.sources.mlflow import MlflowSource

        return MlflowSource(settings)

    return {LOCAL_SCHEME: local, "hf": hub, "s3": s3, "models": mlflow}


class Sources:
    """Every source this process knows, built once per process (sources keep their clients)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.factories = _builtin_factories()
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            self.factories.setdefault(entry.name, entry.load())
        self.allowed = _patterns(settings.allowed_sources)
        self._built: dict[str, Source] = {}

    def source(self, scheme: str) -> Source:
        if scheme not in self._built:
            self._built[scheme] = self.factories[scheme](self.settings)
        return self._built[scheme]

    def remote(self, scheme: str) -> RemoteSource:
        """The source of a remote (fetched) input."""
        source = self.source(scheme)
        assert isinstance(source, RemoteSource), f"{scheme} is not a remote source"
        return source

    def pin(self, ref: str, field: str, tenant: str | None = None) -> PinnedInput:
        """The pinned version of `ref`; 422 for an unknown scheme or a source this deployment, or this tenant,
        may not fetch from."""
        scheme = scheme_of(ref)
        if scheme not in self.factories:
            known = ", ".join(sorted(scheme_form(name) for name in self.factories))
            raise BadReference(field, ref, Problems.REFERENCE_INVALID, f"has an unknown scheme {scheme!r} "
                               f"(known: {known}, or a path)")
        if scheme != LOCAL_SCHEME:
            self.check_allowed(ref, field, tenant, "fetch from")
        return self.source(scheme).pin(ref, field)

    def check_allowed(self, ref: str, field: str, tenant: str | None, verb: str) -> None:
        """422 reference-forbidden for a remote `ref` that MERGE_ALLOWED_SOURCES, or the tenant's own patterns,
        do not match; `verb` says what the service would do with it (fetch from, publish to)."""
        if not _matches(ref, self.allowed):
            raise BadReference(field, ref, Problems.REFERENCE_FORBIDDEN, f"is not among the sources this service "
                               f"may {verb} (MERGE_ALLOWED_SOURCES)")
        tenant_patterns = self.settings.tenant_allowed_sources.get(tenant or "")
        if tenant_patterns is not None and not _matches(ref, _patterns(tenant_patterns)):
            raise BadReference(field, ref, Problems.REFERENCE_FORBIDDEN, f"is not among the sources tenant "
                               f"{tenant!r} may {verb} (MERGE_TENANT_ALLOWED_SOURCES)")


def scheme_form(scheme: str) -> str:
    """How references of a scheme start: `hf://`, `models:/`."""
    return f"{scheme}://" if scheme != "models" else "models:/"


def _patterns(text: str) -> list[str]:
    return [pattern.strip() for pattern in text.split(",") if pattern.strip()]


def _matches(ref: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(ref, pattern) for pattern in patterns)
