"""A thread-safe log of the requests a test server answered, so tests can count them ("fifty merges download
the base once") instead of trusting the client to have behaved.

Each server files one `RequestRecord` per request as soon as the request is parsed (so a request that a test made
stall is visible while it stalls) and sets its `status` when it answers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    """One request as a server saw it."""

    server: str
    """Which listener took it: "hub" or "cdn" for the hub, "s3" for S3."""
    method: str
    path: str
    """The URL path, percent-decoded, without the query."""
    query: dict[str, list[str]]
    key: str | None = None
    """What the request was about, when it named one object: "org/name/path/in/repo" for a hub file (API listings
    have none), "bucket/key" for S3."""
    kind: str = ""
    """The server's name for the operation: "model_info", "tree", "resolve", "blob", ... on the hub; "GetObject",
    "HeadObject", "ListObjectsV2", ... on S3."""
    range: str | None = None
    """The Range header, if any."""
    authorization: bool = False
    """Whether an Authorization header came with it (the hub's CDN must never see one)."""
    status: int | None = None
    """The status answered; None while the request is stalled or if it was never answered."""
    fields: dict[str, str] = field(default_factory=dict)
    """Anything else a server wants to note (the hub: the commit a resolve pinned)."""


class RequestLog:
    """The records of one server (or of a hub and its CDN), newest last."""

    def __init__(self) -> None:
        self._records: list[RequestRecord] = []
        self._lock = threading.Lock()

    def add(self, record: RequestRecord) -> RequestRecord:
        with self._lock:
            self._records.append(record)
        return record

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def records(self, predicate: Callable[[RequestRecord], bool] | None = None) -> list[RequestRecord]:
        with self._lock:
            snapshot = list(self._records)
        return [record for record in snapshot if predicate is None or predicate(record)]

    def __iter__(self) -> Iterator[RequestRecord]:
        return iter(self.records())

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def count(self, *, method: str | None = None, key: str | None = None, kind: str | None = None,
              server: str | None = None, ranged: bool | None = None, statuses: tuple[int, ...] | None = None) -> int:
        """How many requests match every filter given (`ranged`: with or without a Range header)."""

        def matches(record: RequestRecord) -> bool:
            return ((method is None or record.method == method)
                    and (key is None or record.key == key)
                    and (kind is None or record.kind == kind)
                    and (server is None or record.server == server)
                    and (ranged is None or (record.range is not None) == ranged)
                    and (statuses is None or record.status in statuses))

        return len(self.records(matches))
