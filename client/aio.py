"""`AsyncClient`: the merge service from asyncio code, the same calls as `Client` (built and read by
`calls` and `transfer`), awaited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

import adapter_merge.client.calls as calls
from adapter_merge.client.errors import error_for
from adapter_merge.client.models import Job
from adapter_merge.client.transfer import CHUNK_BYTES, transfers


class AsyncClient:
    """One service at `url`; see `Client` for what each call does and raises."""

    def __init__(self, url: str, token: str | None = None, timeout: float = calls.DEFAULT_TIMEOUT) -> None:
        self.http = httpx.AsyncClient(**calls.http_options(url, token, timeout))

    async def _send(self, call: calls.Call) -> httpx.Response:
        return calls.checked(await self.http.request(call.method, call.path, params=call.params, json=call.json,
                                                     headers=call.headers))

    async def submit(self, base: str, adapters: Sequence[str], *, weights: Sequence[float] | None = None,
                     output_dtype: str | None = None, max_shard_size: int | str | None = None,
                     publish: str | dict[str, Any] | None = None, callback_url: str | None = None,
                     reuse: bool = True, idempotency_key: str | None = None) -> Job:
        return Job.from_json((await self._send(calls.submit(
            base, adapters, weights=weights, output_dtype=output_dtype, max_shard_size=max_shard_size,
            publish=publish, callback_url=callback_url, reuse=reuse, idempotency_key=idempotency_key))).json())

    async def get(self, job: Job | str) -> Job:
        return Job.from_json((await self._send(calls.get(calls.job_id(job)))).json())

    async def list(self, status: str | Sequence[str] | None = None, limit: int | None = None) -> AsyncIterator[Job]:
        listing = calls.Listing(status, limit)
        while not listing.done:
            for job in listing.read((await self._send(listing.next_call())).json()):
                yield job

    async def cancel(self, job: Job | str) -> Job:
        return Job.from_json((await self._send(calls.cancel(calls.job_id(job)))).json())

    async def delete(self, job: Job | str) -> None:
        await self._send(calls.delete(calls.job_id(job)))

    async def wait(self, job: Job | str, timeout: float | None = None,
                   on_progress: Callable[[Job], None] | None = None) -> Job:
        poll = calls.Poll(timeout)
        while True:
            current = await self.get(job)
            if on_progress is not None:
                on_progress(current)
            if (done := poll.outcome(current)) is not None:
                return done
            await asyncio.sleep(poll.pause(current))

    async def download(self, job: Job | str, dest: str | Path) -> Sequence[Path]:
        paths = []
        for transfer in transfers(await self.get(job), Path(dest)):
            if not transfer.already_there():
                async with self.http.stream("GET", transfer.artifact.url,
                                            headers=transfer.request_headers()) as response:
                    if not response.is_success:
                        await response.aread()
                        raise error_for(response)
                    with transfer.receiving(response.status_code) as write:
                        async for chunk in response.aiter_bytes(CHUNK_BYTES):
                            write(chunk)
                transfer.finish()
            paths.append(transfer.final)
        return paths

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()
