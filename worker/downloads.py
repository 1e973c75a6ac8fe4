"""The download cache: each pinned remote input fetched once per cache (a node's disk or a shared volume),
verified against what its registry vouches for, and kept until the byte budget needs the room.

    <cache>/<entry>/files/       the input's folder, what the engine reads
    <cache>/<entry>/.complete    written last: only an entry with it is trusted
    <cache>/<entry>/holds/<job>  a running job uses the entry; eviction leaves it alone
    <cache>/<entry>/.partial-*   a download in progress (or left by a crash; the next download removes it)

One download per entry at a time, across processes and hosts: a lock in the job store, renewed while the
download runs and lost by a worker that dies. Files land under a temporary folder, are checked (size, and
sha256 or a single-part ETag's MD5 when the registry gives one), then the folder is renamed into place and
the marker written, so a crashed download never leaves an entry that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from adapter_merge.core.context import JobContext
from adapter_merge.core.jobs import JobStatus
from adapter_merge.core.problems import Problem, Problems
from adapter_merge.core.settings import Settings
from adapter_merge.core.sources.base import ByteCounter, PinnedFile, PinnedInput, RemoteSource
from adapter_merge.core.store import JobStore

log = logging.getLogger(__name__)
MARKER = ".complete"
HASH_CHUNK = 8 << 20


@dataclass(frozen=True)
class Fetched:
    folder: Path
    cache_hit: bool
    bytes_downloaded: int


class DownloadCache:
    def __init__(self, context: JobContext, owner: str) -> None:
        self.settings = context.settings
        self.store = context.store
        self.root = context.settings.cache_root
        self.owner = owner
        """Who holds the download locks this process takes (host:pid)."""

    def entry(self, pinned: PinnedInput) -> Path:
        return self.root / hashlib.sha256(pinned.cache_key.encode()).hexdigest()[:40]

    def has(self, pinned: PinnedInput) -> bool:
        """A complete entry for `pinned` is here (nothing to download)."""
        return (self.entry(pinned) / MARKER).is_file()

    def fetch(self, pinned: PinnedInput, source: RemoteSource, field: str, job_id: str,
              progress: ByteCounter) -> Fetched:
        """The local folder of `pinned`, downloading it unless a complete entry exists; the entry is held for
        `job_id` until `release(job_id)`."""
        entry = self.entry(pinned)
        (entry / "holds").mkdir(parents=True, exist_ok=True)
        (entry / "holds" / job_id).touch()
        if self._complete(entry):
            return Fetched(entry / "files", True, 0)
        lock = f"download:{entry.name}"
        while not self.store.acquire_lock(lock, self.owner, self.settings.lease_seconds):
            time.sleep(self.settings.poll_seconds)  # another worker downloads it: wait for its marker
            if self._complete(entry):
                return Fetched(entry / "files", True, 0)
        try:
            with _LockKeeper(self.store, lock, self.owner, self.settings) as keeper:
                if self._complete(entry):
                    return Fetched(entry / "files", True, 0)
                self._download(entry, pinned, source, field, keeper.checked(progress))
        except Problem as problem:
            raise problem.about(field) from None
        finally:
            self.store.release_lock(lock, self.owner)
        return Fetched(entry / "files", False, pinned.total_bytes)

    def _download(self, entry: Path, pinned: PinnedInput, source: RemoteSource, field: str,
                  progress: ByteCounter) -> None:
        for stale in entry.glob(".partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        partial = entry / f".partial-{uuid.uuid4().hex[:12]}"
        try:
            for file in pinned.files:
                target = partial / file.path
                target.parent.mkdir(parents=True, exist_ok=True)
                source.download(pinned, file, target, progress)
                _verify(target, file, field, pinned.ref)
            shutil.rmtree(entry / "files", ignore_errors=True)  # an unmarked folder a crash left behind
            os.replace(partial, entry / "files")
            _write_marker(entry, pinned)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        log.info("downloaded %s (%d files, %d bytes)", pinned.ref, len(pinned.files), pinned.total_bytes)

    def _complete(self, entry: Path) -> bool:
        marker = entry / MARKER
        if not marker.is_file():
            return False
        os.utime(marker)  # last use, for eviction
        return True

    def release(self, job_id: str) -> None:
        """The job no longer needs its entries."""
        for hold in self.root.glob(f"*/holds/{job_id}"):
            with contextlib.suppress(FileNotFoundError):
                hold.unlink()

    def evict(self) -> list[Path]:
        """Remove the least recently used complete entries that no running job holds, until the cache fits its
        byte budget; returns what was removed."""
        budget = self.settings.cache_max_bytes
        if budget is None or not self.root.is_dir():
            return []
        entries = [(marker.stat().st_mtime, marker.parent, _size(marker.parent / "files"))
                   for marker in self.root.glob(f"*/{MARKER}")]
        total = sum(size for _, _, size in entries)
        removed = []
        for _, entry, size in sorted(entries, key=lambda item: item[0]):
            if total <= budget:
                break
            if self._held(entry):
                continue
            (entry / MARKER).unlink()  # untrusted first, then gone
            shutil.rmtree(entry, ignore_errors=True)
            total -= size
            removed.append(entry)
        return removed

    def _held(self, entry: Path) -> bool:
        """A hold counts while its job is queued or running (a crashed worker's holds do not)."""
        for hold in (entry / "holds").glob("*"):
            job = self.store.get(hold.name)
            if job is not None and job.status in (JobStatus.queued, JobStatus.running):
                return True
        return False


class _LockKeeper:
    """Renews a download lock every heartbeat interval from a thread of its own, however slowly bytes arrive;
    a download that lost its lock (the store gave it to another worker) stops at its next bytes."""

    def __init__(self, store: JobStore, lock: str, owner: str, settings: Settings) -> None:
        self.store, self.lock, self.owner, self.settings = store, lock, owner, settings
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"keep-{lock}", daemon=True)

    def __enter__(self) -> _LockKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                if not self.store.acquire_lock(self.lock, self.owner, self.settings.lease_seconds):
                    self.lost = True
                    return
            except Exception:  # the store is out of reach: try again next beat, the lock outlasts a few
                log.warning("could not renew download lock %s; retrying", self.lock, exc_info=True)

    def checked(self, progress: ByteCounter) -> ByteCounter:
        def arrived(count: int) -> None:
            if self.lost:
                raise Problem(Problems.DOWNLOAD_FAILED, "another worker took over this download (this worker "
                              "could not renew its lock in time); the job will run again")
            progress(count)

        return arrived


def _verify(path: Path, file: PinnedFile, field: str, ref: str) -> None:
    """The bytes are what the registry vouched for at pinning time: size, then sha256 or MD5 where it gave one."""
    size = path.stat().st_size
    if size != file.size:
        raise _corrupt(field, ref, file, f"{size} bytes arrived, {file.size} were pinned")
    expected, algorithm = (file.sha256, "sha256") if file.sha256 else (file.md5, "md5")
    if expected is None:
        return
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise _corrupt(field, ref, file, f"its {algorithm} is {digest.hexdigest()}, the registry says {expected}")


def _corrupt(field: str, ref: str, file: PinnedFile, why: str) -> Problem:
    return Problem(Problems.DOWNLOAD_CORRUPT, f"{field}: {ref!r}: file {file.path!r} is not what was pinned: {why}",
                   field=field, ref=ref, file=file.path)


def _write_marker(entry: Path, pinned: PinnedInput) -> None:
    draft = entry / f".{MARKER}-{uuid.uuid4().hex[:8]}"
    draft.write_text(json.dumps({"cache_key": pinned.cache_key, "ref": pinned.ref, "bytes": pinned.total_bytes,
                                 "files": [file.path for file in pinned.files]}))
    os.replace(draft, entry / MARKER)


def _size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
