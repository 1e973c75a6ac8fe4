"""`Client`: the merge service from blocking Python code."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

import adapter_merge.client.calls as calls
from adapter_merge.client.errors import error_for
from adapter_merge.client.models import Job
from adapter_merge.client.transfer import CHUNK_BYTES, transfers


class Client:
    """One service at `url`; `token` is an API key or a JWT (none when the service runs with MERGE_AUTH=none).
    Every API error is raised as a typed `ApiError` carrying the problem document."""

    def __init__(self, url: str, token: str | None = None, timeout: float = calls.DEFAULT_TIMEOUT) -> None:
        self.http = httpx.Client(**calls.http_options(url, token, timeout))

    def _send(self, call: calls.Call) -> httpx.Response:
        return calls.checked(self.http.request(call.method, call.path, params=call.params, json=call.json,
                                               headers=call.headers))

    def submit(self, base: str, adapters: Sequence[str], *, weights: Sequence[float] | None = None,
               output_dtype: str | None = None, max_shard_size: int | str | None = None,
               publish: str | dict[str, Any] | None = None, callback_url: str | None = None, reuse: bool = True,
               idempotency_key: str | None = None) -> Job:
        """Queue a merge of `adapters` (in order) into `base`; a request that cannot work raises now."""
        return Job.from_json(self._send(calls.submit(
            base, adapters, weights=weights, output_dtype=output_dtype, max_shard_size=max_shard_size,
            publish=publish, callback_url=callback_url, reuse=reuse, idempotency_key=idempotency_key)).json())

    def get(self, job: Job | str) -> Job:
        return Job.from_json(self._send(calls.get(calls.job_id(job))).json())

    def list(self, status: str | Sequence[str] | None = None, limit: int | None = None) -> Iterator[Job]:
        """The caller's jobs, newest first, fetched page by page as the iteration goes."""
        listing = calls.Listing(status, limit)
        while not listing.done:
            yield from listing.read(self._send(listing.next_call()).json())

    def cancel(self, job: Job | str) -> Job:
        """Cancel a queued job at once, or ask a running one to stop (the job shows `cancel_requested`)."""
        return Job.from_json(self._send(calls.cancel(calls.job_id(job))).json())

    def delete(self, job: Job | str) -> None:
        """Remove a finished job and its artifacts."""
        self._send(calls.delete(calls.job_id(job)))

    def wait(self, job: Job | str, timeout: float | None = None,
             on_progress: Callable[[Job], None] | None = None) -> Job:
        """Poll until the job has succeeded and return it; raises JobFailed (with the problem), JobCancelled,
        or WaitTimeout. `on_progress` sees the job at every poll."""
        poll = calls.Poll(timeout)
        while True:
            current = self.get(job)
            if on_progress is not None:
                on_progress(current)
            if (done := poll.outcome(current)) is not None:
                return done
            time.sleep(poll.pause(current))

    def download(self, job: Job | str, dest: str | Path) -> Sequence[Path]:
        """Every artifact of a succeeded job into folder `dest`, each checked against its sha256; a partial
        file left by an interrupted call is resumed. Returns the files' paths."""
        paths = []
        for transfer in transfers(self.get(job), Path(dest)):
            if not transfer.already_there():
                with self.http.stream("GET", transfer.artifact.url, headers=transfer.request_headers()) as response:
                    if not response.is_success:
                        response.read()
                        raise error_for(response)
                    with transfer.receiving(response.status_code) as write:
                        for chunk in response.iter_bytes(CHUNK_BYTES):
                            write(chunk)
                transfer.finish()
            paths.append(transfer.final)
        return paths

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
