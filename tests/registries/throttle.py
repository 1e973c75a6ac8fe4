"""A registry behind a slow link, for real: a TCP proxy on loopback that passes what a client sends at once and
what the server answers at `bytes_per_second` on each connection. moto's server cannot be slowed, and a slow
path the source really reads through (timeouts, resumption, the bytes as they arrive) is what a merge that
overlaps its download has to cope with."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from typing import Any

CHUNK_BYTES = 16 * 1024


class ThrottledProxy:
    """`endpoint_url` forwards to `upstream` (an http://HOST:PORT URL); answers flow at `bytes_per_second`."""

    def __init__(self, upstream: str, bytes_per_second: int) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.bytes_per_second = bytes_per_second
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, name="throttled-proxy", daemon=True)

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> ThrottledProxy:
        self._thread.start()
        return self

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
        with socket.create_connection(proxy.upstream) as upstream:
            sending = threading.Thread(target=_pump, args=(self.request, upstream, None), daemon=True)
            sending.start()
            _pump(upstream, self.request, proxy.bytes_per_second)
            sending.join()


def _pump(source: socket.socket, sink: socket.socket, bytes_per_second: int | None) -> None:
    """Copy until either side closes, no faster than `bytes_per_second` (None: as fast as it comes)."""
    started, sent = time.monotonic(), 0
    try:
        while chunk := source.recv(CHUNK_BYTES):
            sink.sendall(chunk)
            sent += len(chunk)
            if bytes_per_second:
                time.sleep(max(0.0, started + sent / bytes_per_second - time.monotonic()))
        sink.shutdown(socket.SHUT_WR)
    except OSError:  # either side went away: the other learns it when its own socket closes
        for side in (source, sink):
            side.close()
