"""sha256 of files, with a cache of input checksums keyed by file identity.

A service merges many adapters into the same few base models; hashing a 2 GB base on every merge would
cost more than the merge. Like git's index, the cache trusts (device, inode, size, mtime_ns): a file
rewritten in place with its mtime preserved would go unnoticed, which is acceptable for model folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, BinaryIO

HASH_CHUNK_BYTES = 8 * 1024 * 1024
CACHE_FILE = "sha256-cache.json"


def sha256_of(handle: BinaryIO) -> str:
    """sha256 of an open file's contents from where it stands to its end."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    while count := handle.readinto(buffer):
        digest.update(view[:count])
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    with path.open("rb", buffering=0) as handle:
        return sha256_of(handle)


def describe_files(root: Path, paths: list[Path]) -> list[dict[str, Any]]:
    """path (relative to root), size and sha256 of each file."""
    return [{"path": str(path.relative_to(root)), "size": path.stat().st_size, "sha256": sha256_file(path)}
            for path in paths]


class ChecksumCache:
    """Remembers input checksums in `directory`; with no directory it simply hashes every time."""

    def __init__(self, directory: Path | None) -> None:
        self.path = directory / CACHE_FILE if directory else None
        self._entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._dirty = False
        if self.path and self.path.is_file():
            try:
                self._entries = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self._entries = {}  # a damaged cache is only a slower merge

    def sha256(self, path: Path, handle: BinaryIO) -> str:
        """sha256 of `path`, open as `handle` (which is read only when the cache has no entry for it)."""
        stat = os.fstat(handle.fileno())
        identity = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns]
        key = os.path.realpath(path)
        with self._lock:
            entry = self._entries.get(key)
            if entry and entry.get("identity") == identity:
                return str(entry["sha256"])
        digest = sha256_of(handle)
        with self._lock:
            self._entries[key] = {"identity": identity, "sha256": digest}
            self._dirty = True
        return digest

    def save(self) -> None:
        """Write the cache atomically; concurrent merges may each save, and the last one wins."""
        if not (self.path and self._dirty):
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(f".{CACHE_FILE}.{os.getpid()}.{threading.get_ident()}")
            temporary.write_text(json.dumps(self._entries), encoding="utf-8")
            temporary.replace(self.path)
        except OSError:
            pass  # the cache is an optimisation; failing to store it must not fail the merge
