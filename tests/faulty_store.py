"""An HTTP proxy on 127.0.0.1 in front of the test S3 server that fails requests on demand.

`plan(n)` decides the fate of the proxy's n-th request (from 1): None forwards it; "500"
answers S3's InternalError, "503" its SlowDown (throttling); "drop" closes the connection
without an answer. Requests and faults are counted.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERRORS = {"500": ("InternalError", "We encountered an internal error. Please try again."),
          "503": ("SlowDown", "Please reduce your request rate.")}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}

Plan = Callable[[int], str | None]


class FaultyStore:
    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.plan: Plan = lambda n: None
        self.requests = 0
        self.faults: Counter[str] = Counter()
        self._lock = threading.Lock()

    def fate(self) -> str | None:
        with self._lock:
            self.requests += 1
            fault = self.plan(self.requests)
            if fault:
                self.faults[fault] += 1
            return fault


def _handler(store: FaultyStore) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # a line per request otherwise
            pass

        def _relay(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            fault = store.fate()
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(2)  # no answer at all: the client sees the connection go
                return
            if fault in ERRORS:
                code, message = ERRORS[fault]
                payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                           f"<Message>{message}</Message></Error>").encode()
                self.send_response(int(fault))
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            upstream = http.client.HTTPConnection(store.upstream.hostname, store.upstream.port, timeout=60)
            try:
                upstream.request(self.command, self.path, body=body,
                                 headers={k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                                 | ({"Content-Length": str(length)} if body is not None else {}))
                answer = upstream.getresponse()
                payload = answer.read()
            finally:
                upstream.close()
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

    return Handler


class _Quiet(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client gone after a drop: expected here
        pass


@contextmanager
def faulty(upstream: str) -> Iterator[tuple[str, FaultyStore]]:
    """(endpoint URL, its FaultyStore) of a proxy to `upstream`, for the block."""
    store = FaultyStore(upstream)
    server = _Quiet(("127.0.0.1", 0), _handler(store))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", store
    finally:
        server.shutdown()
        server.server_close()
