"""A registry behind a slow link, for real: a TCP proxy on loopback that passes what a client sends at once and
what the server answers at `bytes_per_second`, all connections together (one link: requests opened ahead of time
share it, as they would a real one). moto's server cannot be slowed, and a slow path the source really reads
through (timeouts, resumption, the bytes as they arrive) is what a merge that overlaps its download has to cope
with."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from typing import Any

CHUNK_BYTES = 16 * 1024
SEND_BUFFER_BYTES = 64 * 1024
"""Kept small, so that what a client has not read yet stays on the server's side of the link."""


class ThrottledProxy:
    """`endpoint_url` forwards to `upstream` (an http://HOST:PORT URL); answers flow at `bytes_per_second`."""

    def __init__(self, upstream: str, bytes_per_second: int) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.bytes_per_second = bytes_per_second
        self._link = threading.Lock()
        self._free_at = 0.0
        """When the link has sent what it was given so far."""
        self._connections: set[socket.socket] = set()
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, name="throttled-proxy", daemon=True)

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> ThrottledProxy:
        self._thread.start()
        return self

    def send(self, sink: socket.socket, chunk: bytes) -> None:
        """`chunk` to `sink`, then as long as the link takes to carry it. A connection its client does not read
        stalls in `sendall` (its buffers are small) and takes none of the link meanwhile."""
        sink.sendall(chunk)
        with self._link:
            now = time.monotonic()
            self._free_at = max(self._free_at, now) + len(chunk) / self.bytes_per_second
            wait = self._free_at - now
        time.sleep(wait)

    def cut(self) -> None:
        """Break every connection open now, both ways (a link that fails mid-transfer)."""
        with self._link:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, proxy: ThrottledProxy) -> None:
        super().__init__(("127.0.0.1", 0), _Connection)
        self.proxy = proxy


class _Connection(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        proxy: Any = self.server.proxy  # type: ignore[attr-defined]
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        with socket.create_connection(proxy.upstream) as upstream:
            with proxy._link:
                proxy._connections |= {self.request, upstream}
            sending = threading.Thread(target=_pump, args=(self.request, upstream, socket.socket.sendall),
                                       daemon=True)
            sending.start()
            _pump(upstream, self.request, proxy.send)
            sending.join()
            with proxy._link:
                proxy._connections -= {self.request, upstream}


def _pump(source: socket.socket, sink: socket.socket, send: Callable[[socket.socket, bytes], object]) -> None:
    """Copy with `send` until either side closes."""
    try:
        while chunk := source.recv(CHUNK_BYTES):
            send(sink, chunk)
        sink.shutdown(socket.SHUT_WR)
    except OSError:  # either side went away: the other learns it when its own socket closes
        for side in (source, sink):
            side.close()
