"""Jobs as the client reads them: the few fields its own logic needs, typed, and everything else the server
sent in `data`, so fields added by a newer server are kept, never refused."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FINISHED = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class Artifact:
    path: str
    """Path inside the merged model folder."""
    size: int
    sha256: str
    url: str
    """Relative to the service's URL."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Artifact:
        return cls(path=data["path"], size=data["size"], sha256=data["sha256"], url=data["url"])


@dataclass(frozen=True)
class Progress:
    phase: str = "queued"
    tensors_done: int = 0
    tensors_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0

    @property
    def fraction(self) -> float:
        """Share of the current phase done, 0.0 to 1.0 (bytes while downloading or merging)."""
        return min(1.0, self.bytes_done / self.bytes_total) if self.bytes_total else 0.0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Progress:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    """queued, running, succeeded, failed or cancelled."""
    progress: Progress
    artifacts: tuple[Artifact, ...]
    """Empty until the job has succeeded."""
    error: dict[str, Any] | None
    """The problem document (RFC 9457) of a failed job: `type`, `title`, `status`, `detail`, ..."""
    data: dict[str, Any] = field(repr=False, compare=False)
    """The job exactly as the server sent it: request, inputs, timings, metrics, and any newer field."""

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        return cls(id=data["id"], status=data["status"], progress=Progress.from_json(data.get("progress") or {}),
                   artifacts=tuple(Artifact.from_json(item) for item in data.get("artifacts") or ()),
                   error=data.get("error"), data=data)
