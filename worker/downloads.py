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

A merge starts before its inputs are all in (`Arrivals`). A download first fetches what planning reads: the
files it reads whole (configs, the shard index) and each safetensors file's header, in a placeholder of the
file's size (the header read from the file's own download request, which goes on later where it stopped).
The merge plans on `.partial-*/files/` and starts while the other files arrive on a thread of their own, each
downloaded beside that folder, checked, then moved over its placeholder. The engine waits for a file to be
complete before it reads its contents (`MergeOptions.await_file`, which `Arrivals.await_file` answers). The
engine reads its inputs by path until its very end (the side files it copies), so the folder moves into place,
and the lock is given up, once the merge is done with it: a second job for the same input waits until then,
and reuses the entry.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from adapter_merge.core.context import JobContext
from adapter_merge.core.jobs import JobStatus
from adapter_merge.core.problems import Problem, Problems
from adapter_merge.core.sources.base import ByteCounter, PinnedFile, PinnedInput, RegistryUnavailable, RemoteSource
from adapter_merge.core.sources.replica import header_bytes, read_whole, write_placeholder
from adapter_merge.core.sources.transfer import OpenedDownload, StreamedSource, fetch_failed
from adapter_merge.worker.engine import MergeCancelled
from adapter_merge.worker.locks import LockKeeper

log = logging.getLogger(__name__)
MARKER = ".complete"
HASH_CHUNK = 8 << 20
POLL_SECONDS = 0.1
STAGING_THREADS = 8
"""How often a merge waiting for a file checks whether its run must stop."""


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
        """The local folder of `pinned`, downloaded whole unless a complete entry exists; the entry is held for
        `job_id` until `release(job_id)`."""
        found = self.claim(pinned, source, field, job_id, progress)
        if isinstance(found, Fetched):
            return found
        try:
            found.stage(placeholders=False)
            for file in list(found.pending):
                found.arrive(file)
            return found.commit()
        finally:
            found.close()

    def claim(self, pinned: PinnedInput, source: RemoteSource, field: str, job_id: str,
              progress: ByteCounter) -> Fetched | Download:
        """`pinned`'s complete entry, held for `job_id` until `release(job_id)`; or, when there is none, its
        download, for the caller to run and close (the entry's lock is held until then). While another worker
        downloads it, this waits for that download and takes its entry."""
        entry = self.entry(pinned)
        (entry / "holds").mkdir(parents=True, exist_ok=True)
        (entry / "holds" / job_id).touch()
        lock = f"download:{entry.name}"
        while not self._complete(entry):
            if self.store.acquire_lock(lock, self.owner, self.settings.lease_seconds):
                if not self._complete(entry):
                    return Download(self, entry, lock, pinned, source, field, progress)
                self.store.release_lock(lock, self.owner)  # it was completed just before we took the lock
                break
            time.sleep(self.settings.poll_seconds)  # another worker downloads it: wait for its marker
        return Fetched(entry / "files", True, 0)

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


class Download:
    """One input on its way into its cache entry, under the entry's download lock: `stage` fetches what planning
    reads, `arrive` brings each `pending` file, `commit` moves the folder into place and trusts it, and `close`
    gives the lock up and removes whatever was not committed."""

    def __init__(self, cache: DownloadCache, entry: Path, lock: str, pinned: PinnedInput, source: RemoteSource,
                 field: str, progress: ByteCounter) -> None:
        self.cache, self.entry, self.lock = cache, entry, lock
        self.pinned, self.source, self.field = pinned, source, field
        self.partial = entry / f".partial-{uuid.uuid4().hex[:12]}"
        self.folder = self.partial / "files"
        """What the engine reads until `commit`: the files that arrived, and placeholders for the `pending`."""
        self.pending: list[PinnedFile] = []
        self.staged = self.committed = False
        self._opened: dict[str, OpenedDownload] = {}
        """Pending files whose download request was made to read their header."""
        self._keeper = LockKeeper(cache.store, lock, cache.owner, cache.settings)
        self._progress = self._checked(progress)

    def _checked(self, progress: ByteCounter) -> ByteCounter:
        """`progress`, stopping the download at its next bytes once its lock went to another worker."""
        def arrived(count: int) -> None:
            if self._keeper.lost:
                raise _taken_over(None)
            progress(count)

        return arrived

    def stage(self, *, placeholders: bool = True) -> None:
        """Remove what a crashed download left; fetch the files planning reads whole, and unless the merge waits
        for the whole download (`placeholders` False) a placeholder with its header for every other one. Those are
        `pending`, in the order a merge reads them: the safetensors files by name (a base's shards hold its
        tensors in that order), then the rest smallest first (files copied into the output; weights in other
        formats, which no merge reads, last)."""
        for stale in self.entry.glob(".partial-*"):
            if stale != self.partial:
                shutil.rmtree(stale, ignore_errors=True)

        def stage_one(file: PinnedFile) -> None:
            if read_whole(file):
                self.arrive(file)
            elif placeholders:
                write_placeholder(self.folder / file.path, file.size, self._header(file))

        # Side by side: each is a request, and a server may take long over the first byte of a big file.
        with ThreadPoolExecutor(STAGING_THREADS) as pool:
            list(pool.map(stage_one, self.pinned.files))
        self.pending = [file for file in self.pinned.files if not read_whole(file)]
        self.pending.sort(key=lambda file: (not file.path.endswith(".safetensors"),
                                            0 if file.path.endswith(".safetensors") else file.size, file.path))
        self.staged = True

    def _header(self, file: PinnedFile) -> bytes:
        try:
            return header_bytes(file, self._reader(file))
        except RegistryUnavailable as problem:  # planning's reads call that a 503; here it fails the download
            log.info("reading the header of %s in %s: %s", file.path, self.pinned.ref, problem.detail)
            raise fetch_failed(self.pinned, file, "its registry could not be reached", unreachable=False).about(
                self.field) from None
        except Problem as problem:
            raise problem.about(self.field) from None

    def _reader(self, file: PinnedFile) -> Callable[[int, int], bytes]:
        """How planning's bytes of a safetensors `file` are read: from its own download, opened now, where the
        source can (one request, not three); else by ranged reads."""
        if not (isinstance(self.source, StreamedSource) and file.path.endswith(".safetensors")):
            return lambda start, length: self.source.read_range(self.pinned, file, start, length)
        opened = self._opened[file.path] = self.source.opened(self.pinned, file)
        return lambda start, length: opened.head(start + length)[start:]

    def arrive(self, file: PinnedFile) -> None:
        """Download `file` beside the folder, check it, and put it in place (over its placeholder)."""
        arriving = self.partial / "arriving" / file.path
        arriving.parent.mkdir(parents=True, exist_ok=True)
        opened = self._opened.pop(file.path, None)
        try:
            if opened is not None:
                opened.download(arriving, self._progress)
            else:
                self.source.download(self.pinned, file, arriving, self._progress)
            _verify(arriving, file, self.field, self.pinned.ref)
        except Problem as problem:
            raise problem.about(self.field) from None
        target = self.folder / file.path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(arriving, target)
        if file in self.pending:  # (a file fetched while staging is not)
            self.pending.remove(file)

    @property
    def complete(self) -> bool:
        """Every file arrived and was checked, under a lock this worker still holds."""
        return self.staged and not self.pending and not self._keeper.lost

    def commit(self) -> Fetched:
        """Move the folder into place and trust it."""
        if not self.complete:
            raise _taken_over(self.field)
        shutil.rmtree(self.entry / "files", ignore_errors=True)  # an unmarked folder a crash left behind
        os.replace(self.folder, self.entry / "files")
        _write_marker(self.entry, self.pinned)
        self.committed = True
        log.info("downloaded %s (%d files, %d bytes)", self.pinned.ref, len(self.pinned.files),
                 self.pinned.total_bytes)
        return Fetched(self.entry / "files", False, self.pinned.total_bytes)

    def close(self) -> None:
        for opened in self._opened.values():
            opened.close()
        self._keeper.stop()
        shutil.rmtree(self.partial, ignore_errors=True)
        self.cache.store.release_lock(self.lock, self.cache.owner)


class Arrivals:
    """The remote inputs of one merge that starts before they are all in. `prepare` claims each one (its complete
    entry, or its download, staged), `start` brings the pending files on a thread of its own while the engine
    waits in `await_file` for any it needs that are still on their way, `finish` waits for the last one and
    commits, and `close` stops whatever still runs. A cancelled run stops both the merge and the downloads."""

    def __init__(self, cache: DownloadCache, job_id: str, downloading: Callable[[int], ByteCounter],
                 should_stop: Callable[[], bool]) -> None:
        self.cache, self.job_id, self.downloading, self.should_stop = cache, job_id, downloading, should_stop
        self.fetched: list[Fetched] = []
        """Each input, found in the cache or downloaded (once `finish` returned)."""
        self.seconds = 0.0
        """From the first request until the last file arrived and was checked (or the entries were found)."""
        self.staging_seconds = 0.0
        """The part of `seconds` before the merge could start (`prepare`)."""
        self._folders: dict[Path, Path] = {}
        self._downloads: dict[Path, Download] = {}
        self._waiting: set[Path] = set()
        self._failure: BaseException | None = None
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.perf_counter()

    def prepare(self, inputs: list[tuple[PinnedInput, RemoteSource, str]]) -> None:
        """Claim every input (pinned, its source, its request field), in cache entry order (two jobs taking two
        locks in opposite orders would wait for each other forever), then stage the downloads in the order given,
        which is the order their pending files will arrive in."""
        unique: dict[Path, tuple[PinnedInput, RemoteSource, str]] = {}
        for pinned, source, field in inputs:
            unique.setdefault(self.cache.entry(pinned), (pinned, source, field))
        missing = {entry for entry, (pinned, _, _) in unique.items() if not self.cache.has(pinned)}
        total = sum(unique[entry][0].total_bytes for entry in missing)
        arrived = self._stoppable(self.downloading(total) if total else lambda count: None)
        for entry in sorted(unique):
            pinned, source, field = unique[entry]
            found = self.cache.claim(pinned, source, field, self.job_id, arrived)
            if isinstance(found, Fetched):
                if entry in missing:  # another worker's download, waited for: its bytes are in all the same
                    arrived(pinned.total_bytes)
                self.fetched.append(found)
                self._folders[entry] = found.folder
            else:
                self._downloads[entry] = found
                self._folders[entry] = found.folder
        self._downloads = {entry: self._downloads[entry] for entry in unique if entry in self._downloads}
        for download in self._downloads.values():
            download.stage()
            self._waiting |= {download.folder / file.path for file in download.pending}
        self.staging_seconds = self.seconds = time.perf_counter() - self._started

    def folder(self, pinned: PinnedInput) -> Path:
        """Where the engine reads `pinned`."""
        return self._folders[self.cache.entry(pinned)]

    @property
    def streaming(self) -> bool:
        """Files are still to arrive once the merge starts."""
        return bool(self._waiting)

    def _stoppable(self, arrived: ByteCounter) -> ByteCounter:
        def counted(count: int) -> None:
            if self._stop.is_set() or self.should_stop():
                raise MergeCancelled("stopped while downloading")
            arrived(count)

        return counted

    def start(self) -> None:
        if not self.streaming:
            return
        queue = [(download, file) for download in self._downloads.values() for file in download.pending]
        # In the runner's context, so its lines name the job as the runner's own do (core/logs.py).
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run, queue),
                                        name=f"arrivals-{self.job_id}", daemon=True)
        self._thread.start()

    def _run(self, queue: list[tuple[Download, PinnedFile]]) -> None:
        try:
            for download, file in queue:
                download.arrive(file)
                with self._changed:
                    self._waiting.discard(download.folder / file.path)
                    self._changed.notify_all()
        except BaseException as error:
            with self._changed:
                self._failure = error
                self._changed.notify_all()
        finally:
            self.seconds = time.perf_counter() - self._started

    def await_file(self, path: Path) -> None:
        """Return once `path` is complete (at once for any file that is not on its way); raise the download's
        problem if it failed, `MergeCancelled` if the run must stop meanwhile."""
        with self._changed:
            while path in self._waiting:
                if self._failure is not None:
                    raise self._failure
                if self.should_stop():
                    raise MergeCancelled("merge cancelled")
                self._changed.wait(POLL_SECONDS)

    def finish(self) -> None:
        """Wait for the last file and trust every download; a download that failed fails the run now."""
        if self._thread is not None:
            self._thread.join()
        if self._failure is not None:
            raise self._failure
        self.fetched += [download.commit() for download in self._downloads.values()]

    def close(self) -> None:
        """Stop downloading and give up every lock. A download that did all arrive is trusted even when the
        merge failed or stopped (its retry need not fetch it again); the rest is removed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for download in self._downloads.values():
            try:
                if download.complete and not download.committed:
                    download.commit()
            except (OSError, Problem):
                log.warning("could not keep the download of %s", download.pinned.ref, exc_info=True)
            finally:
                download.close()


def _taken_over(field: str | None) -> Problem:
    problem = Problem(Problems.DOWNLOAD_FAILED, "another worker took over this download (this worker could not "
                      "renew its lock in time); the job will run again")
    return problem.about(field) if field else problem


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
