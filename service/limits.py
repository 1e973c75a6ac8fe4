"""Limits that keep one client from tying up the API: request size and how long sending a request may take.

- `RequestLimits` (ASGI middleware) refuses a body over the limit with 413 before reading it (by its
  Content-Length) or as soon as it grows past it (chunked), and answers 408 when the body does not arrive in
  time. Bodies are small (a merge request), so it reads them whole and hands the app the buffered body.
- `HeaderTimeoutProtocol` (uvicorn's h11 protocol) closes a connection whose request headers do not arrive
  in time: uvicorn's keep-alive timer stops at the first byte, so a client sending one byte a second would
  otherwise hold its connection for ever.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anyio
import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from adapter_merge.core.problems import Problem, Problems

PROBLEM_MEDIA_TYPE = b"application/problem+json"


class RequestLimits:
    def __init__(self, app: ASGIApp, max_bytes: int, read_seconds: float) -> None:
        self.app, self.max_bytes, self.read_seconds = app, max_bytes, read_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _answer(send, scope, self._too_large(declared))
            return
        try:
            with anyio.fail_after(self.read_seconds):
                body = await self._read(receive)
        except TimeoutError:
            await _answer(send, scope, Problem(Problems.REQUEST_TIMEOUT, f"the request body did not arrive "
                                               f"within {self.read_seconds:g} s"))
            return
        except _TooLarge as error:
            await _answer(send, scope, self._too_large(error.size))
            return
        if body is None:  # the client went away
            return
        await self.app(scope, _replay(body, receive), send)

    def _too_large(self, size: int) -> Problem:
        return Problem(Problems.REQUEST_TOO_LARGE, f"the request body has {size} bytes or more; the limit is "
                       f"{self.max_bytes} (MERGE_MAX_REQUEST_BYTES)", limit=self.max_bytes)

    async def _read(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge(size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value) if len(value) <= 18 else 10**18
            except ValueError:
                return None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """The buffered body as one message; afterwards, the real channel (to hear a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _answer(send: Send, scope: Scope, problem: Problem) -> None:
    body = json.dumps(problem.to_dict(scope.get("path"))).encode()
    headers: list[Any] = [(b"content-type", PROBLEM_MEDIA_TYPE), (b"content-length", str(len(body)).encode()),
                          (b"connection", b"close")]
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class HeaderTimeoutProtocol(H11Protocol):
    """Closes the connection when a request's headers are not complete `header_timeout` seconds after the
    connection opened or the previous response finished."""

    header_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in: the body has its own limit
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()
