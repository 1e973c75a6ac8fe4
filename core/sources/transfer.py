"""How the remote sources move bytes, written once: retries with backoff for clients that have none, ranged reads
that cost no more than the range even from a server that ignores Range, downloads that resume where a broken
transfer stopped, and `StreamedSource`, which builds `read_range` and `download` on one stream opener. A download
can be opened ahead (`StreamedSource.opened`): its first bytes are read then, and the rest later from the same
request, so the worker learns a file's header for planning without a request of its own (on a server that
answers a range by reading the whole object, as moto does, a header costs as much as the file)."""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import ClassVar, TypeVar

from adapter_merge.core.problems import Problem, Problems
from adapter_merge.core.sources.base import ByteCounter, PinnedFile, PinnedInput, RegistryUnavailable


def fetch_failed(pinned: PinnedInput, file: PinnedFile, reason: str, *, unreachable: bool) -> Problem:
    """A pinned file that could not be read: while planning, a registry out of reach is a 503 as at pinning
    (`unreachable`); anything else, and any failure of a download, is download-failed naming the file."""
    if unreachable:
        return RegistryUnavailable(None, pinned.ref, reason)
    return Problem(Problems.DOWNLOAD_FAILED, f"{pinned.ref!r}: file {file.path!r} could not be fetched as pinned: "
                   f"{reason}", ref=pinned.ref, file=file.path)


class StreamedSource(ABC):
    """The byte half of a remote source, written once. A source supplies `open_stream` (one request, retried as its
    client retries, answered with a pinned file's bytes from an offset, or a `fetch_failed` problem) and names the
    errors its streams raise when a transfer breaks off; `read_range` and `download` follow, the latter resuming a
    broken transfer where it stopped."""

    STREAM_ERRORS: ClassVar[tuple[type[Exception], ...]]
    """What reading an open stream raises when the connection fails (a read timeout, a dropped connection)."""
    retries: int

    @abstractmethod
    def open_stream(self, pinned: PinnedInput, file: PinnedFile, first: int, last: int | None, *,
                    reading: bool) -> AbstractContextManager[Iterable[bytes]]:
        """`file`'s bytes `first` to `last` (to its end if None); `reading` is true while planning, where a
        registry out of reach is a 503 rather than a failed download."""

    @abstractmethod
    def describe(self, error: Exception) -> str:
        """Why a request or a stream failed, naming no URL or credential."""

    def read_range(self, pinned: PinnedInput, file: PinnedFile, start: int, length: int) -> bytes:
        length = min(length, file.size - start)
        if length <= 0:
            return b""
        try:
            with self.open_stream(pinned, file, start, start + length - 1, reading=True) as chunks:
                return first_bytes(chunks, length)
        except self.STREAM_ERRORS as error:
            raise fetch_failed(pinned, file, self.describe(error), unreachable=True) from None

    def download(self, pinned: PinnedInput, file: PinnedFile, dest: Path, progress: ByteCounter) -> None:
        self.opened(pinned, file).download(dest, progress)

    def opened(self, pinned: PinnedInput, file: PinnedFile) -> OpenedDownload:
        """The download of `file`, to read its first bytes now (`head`) and the whole of it later (`download`)."""
        return OpenedDownload(self, pinned, file)

    def chunks_from(self, pinned: PinnedInput, file: PinnedFile, offset: int) -> Generator[bytes, None, None]:
        """`file`'s bytes from `offset` to its end; the request is made at the first chunk asked for."""
        with self.open_stream(pinned, file, offset, None, reading=False) as chunks:
            yield from chunks


class OpenedDownload:
    """One file's download on one request: `head` reads its first bytes from it (and keeps them), `download`
    writes the whole file, going on with that request, resuming as `download_resuming` does if it broke off.
    `close` gives the request up unless `download` did."""

    def __init__(self, source: StreamedSource, pinned: PinnedInput, file: PinnedFile) -> None:
        self.source, self.pinned, self.file = source, pinned, file
        self._first: Generator[bytes, None, None] | None = source.chunks_from(pinned, file, 0)
        self._head = bytearray()

    def head(self, length: int) -> bytes:
        """The file's first `length` bytes (fewer at its end)."""
        try:
            while self._first is not None and len(self._head) < length:
                chunk = next(self._first, None)
                if chunk is None:
                    break
                self._head += chunk
        except self.source.STREAM_ERRORS as error:
            raise fetch_failed(self.pinned, self.file, self.source.describe(error), unreachable=False) from None
        return bytes(self._head[:length])

    def download(self, dest: Path, progress: ByteCounter) -> None:
        """Write the whole file to `dest` (which does not exist yet), reporting bytes as they arrive."""
        def chunks_from(offset: int) -> Iterator[bytes]:
            if offset == 0 and self._first is not None:  # the opened request, with what `head` read of it
                first, self._first = self._first, None
                return itertools.chain([bytes(self._head)] if self._head else [], first)
            self.close()
            return self.source.chunks_from(self.pinned, self.file, offset)

        try:
            download_resuming(chunks_from, self.file.size, dest, progress, self.source.retries,
                              lambda error: isinstance(error, self.source.STREAM_ERRORS))
        except EOFError as error:
            raise fetch_failed(self.pinned, self.file, str(error), unreachable=False) from None
        except self.source.STREAM_ERRORS as error:
            raise fetch_failed(self.pinned, self.file, self.source.describe(error), unreachable=False) from None
        finally:
            self.close()

    def close(self) -> None:
        if self._first is not None:
            self._first.close()
            self._first = None


BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 8.0
T = TypeVar("T")


def backoff_seconds(retry: int) -> float:
    """The pause before retry number `retry` (0 for the first): 0.5 s, doubling, at most 8 s."""
    return min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2**retry)


def retrying(call: Callable[[], T], retries: int, transient: Callable[[Exception], bool]) -> T:
    """`call()`, made again after a transient failure (`transient(error)`: a timeout, a dropped connection, a 5xx)
    at most `retries` times with backoff; any other failure, or the last one, propagates. For clients that have no
    retry policy of their own (boto3 and MLflow's transport do)."""
    retry = 0
    while True:
        try:
            return call()
        except Exception as error:
            if retry >= retries or not transient(error):
                raise
        time.sleep(backoff_seconds(retry))
        retry += 1


def download_resuming(chunks_from: Callable[[int], Iterable[bytes]], size: int, dest: Path, progress: ByteCounter,
                      retries: int, broken: Callable[[Exception], bool]) -> None:
    """Write to `dest` the `size` bytes that `chunks_from(offset)` streams from `offset` on. A transfer that breaks
    off half-way (`broken(error)`, or a stream that ends short) is resumed where it stopped, after a backoff; after
    `retries` breaks in a row with no byte in between, the last error propagates. Request retries cannot cover
    this: the request succeeded, its body did not arrive. `chunks_from` raises a `Problem` for what resuming
    cannot mend (the object changed, the registry refused)."""
    written, failures = 0, 0
    with dest.open("wb") as out:
        while True:
            before = written
            try:
                for chunk in chunks_from(written):
                    out.write(chunk)
                    written += len(chunk)
                    progress(len(chunk))
                if written >= size:
                    return
                raise EOFError(f"the stream ended after {written} of {size} bytes")
            except Exception as error:
                failures = 1 if written > before else failures + 1
                if failures > retries or not (isinstance(error, EOFError) or broken(error)):
                    raise
            time.sleep(backoff_seconds(failures - 1))


def skip_bytes(chunks: Iterable[bytes], count: int) -> Iterator[bytes]:
    """`chunks` without their first `count` bytes: what to do with the whole file a server sends when it ignores a
    Range (some hub mirrors, an artifact proxy in front of another store)."""
    for chunk in chunks:
        if count >= len(chunk):
            count -= len(chunk)
            continue
        yield chunk[count:]
        count = 0


def first_bytes(chunks: Iterable[bytes], length: int) -> bytes:
    """The first `length` bytes of `chunks` (fewer if they end first), reading no further: a range cut from a
    whole file costs only the bytes before its end."""
    data = bytearray()
    for chunk in chunks:
        data += chunk[:length - len(data)]
        if len(data) >= length:
            break
    return bytes(data)


def range_header(first: int, last: int | None = None) -> dict[str, str]:
    """The Range header asking bytes `first` to `last` (to the end if None); none for the whole file."""
    if not first and last is None:
        return {}
    return {"Range": f"bytes={first}-{'' if last is None else last}"}
