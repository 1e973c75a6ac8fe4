"""Local folders inside the model roots: bare paths and `file://` URIs. Nothing to pin or download; the
folder is checked (inside the roots, every file in it too) each time it is used."""

from __future__ import annotations

from pathlib import Path

from adapter_merge.core.problems import Problems
from adapter_merge.core.refs import BadReference, LocalRootsResolver
from adapter_merge.core.sources.base import PinnedInput

FILE_PREFIX = "file://"


class LocalSource:
    scheme = "file"

    def __init__(self, roots: list[Path]) -> None:
        self.resolver = LocalRootsResolver(roots)

    def pin(self, ref: str, field: str) -> PinnedInput:
        path = ref
        if ref.startswith(FILE_PREFIX):
            path = ref[len(FILE_PREFIX):]
            if not path.startswith("/"):
                raise BadReference(field, ref, Problems.REFERENCE_INVALID, "must be file:///absolute/path")
        return PinnedInput(ref=ref, scheme=self.scheme, version={}, local_path=str(self.resolver.resolve(path, field)))
