"""An HTTP proxy between a broker and the S3 server that injects the failures real
object stores produce: 5xx answers (before or after the request reached the store),
added latency, connection resets and stalls.

Runs in a thread of the test process. `faults` is changed while the broker runs; each
request draws one fault at random from it (probabilities, the rest pass cleanly).
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b'<Message>Please reduce your request rate.</Message></Error>')


class FaultyProxy:
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.lock = threading.Lock()
        self.faults: dict[str, float] = {}
        self.latency_s = 0.2
        self.counts: dict[str, int] = {}
        self.stall_release = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _serve(self):
                body = b""
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    body = self.rfile.read(n)
                fault = proxy.draw()
                if fault == "reset":
                    # RST instead of FIN: the client sees "connection reset by peer".
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "stall":
                    proxy.stall_release.wait(120)
                    self.close_connection = True
                    return
                if fault == "error":
                    self._reply(503, {"Content-Type": "application/xml"}, SLOW_DOWN)
                    return
                if fault == "latency":
                    time.sleep(proxy.latency_s)
                status, headers, data = proxy.forward(self.command, self.path, self.headers, body)
                if fault == "error_after":
                    # The store did the work; the answer is lost and replaced by a 503.
                    self._reply(503, {"Content-Type": "application/xml"}, SLOW_DOWN)
                    return
                self._reply(status, headers, data)

            def _reply(self, status, headers, data):
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                         "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def set_faults(self, **faults: float) -> None:
        """e.g. set_faults(error=0.1, reset=0.05); set_faults() clears them."""
        with self.lock:
            self.faults = dict(faults)
            if "stall" in faults:
                self.stall_release.clear()
            else:
                self.stall_release.set()

    def draw(self) -> str | None:
        with self.lock:
            r = random.random()
            for name, p in self.faults.items():
                if r < p:
                    self.counts[name] = self.counts.get(name, 0) + 1
                    return name
                r -= p
            self.counts["clean"] = self.counts.get("clean", 0) + 1
            return None

    def forward(self, method, path, headers, body):
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        try:
            fwd = {k: v for k, v in headers.items() if k.lower() not in ("connection",)}
            conn.request(method, path, body=body if body else None, headers=fwd)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, dict(resp.getheaders()), data
        finally:
            conn.close()

    def close(self) -> None:
        self.stall_release.set()
        self.server.shutdown()
        self.server.server_close()
