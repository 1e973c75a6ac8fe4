"""Handing a queued job to whatever runs it. The job record is the source of truth in both modes; a message
is only a wake-up call, so sending one twice is harmless (the second delivery finds the job claimed)."""

from __future__ import annotations

from typing import Protocol


class Dispatcher(Protocol):
    def submit(self, job_id: str) -> None: ...

    def ping(self) -> None:
        """Raise if jobs cannot be handed over now."""
        ...


class StoreQueue:
    """Embedded mode: no broker; the local worker claims queued jobs straight from the store."""

    def submit(self, job_id: str) -> None:
        return None

    def ping(self) -> None:
        return None
