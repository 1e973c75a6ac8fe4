"""The composition root's product: the job store, data layout, sources and publish targets of one process, built
once from its settings and handed to everything in that process that needs them."""

from __future__ import annotations

from dataclasses import dataclass

from adapter_merge.core.layout import DataLayout
from adapter_merge.core.publish.registry import PublishTargets
from adapter_merge.core.settings import Settings
from adapter_merge.core.sources.registry import Sources
from adapter_merge.core.store import JobStore, open_store


@dataclass
class JobContext:
    settings: Settings
    store: JobStore
    layout: DataLayout
    sources: Sources
    publish_targets: PublishTargets

    @classmethod
    def open(cls, settings: Settings) -> JobContext:
        layout = DataLayout(settings.data_dir)
        layout.ensure()
        if not settings.model_roots:  # the default root lives in the data dir; create it for first use
            settings.roots[0].mkdir(parents=True, exist_ok=True)
        sources = Sources(settings)
        return cls(settings, open_store(settings), layout, sources, PublishTargets(sources))

    def close(self) -> None:
        self.store.close()
