"""A fault-injecting HTTP proxy in front of the moto S3 server, for tests only.

It listens on 127.0.0.1 (never anything else), forwards every request to the moto endpoint, and
answers some with an S3 error instead, chosen by `rule(method, path, n)` -> None (forward) or
(status, S3 error code). Bounded: at most `max_faults` faults, each request with a timeout, and
the server stops with the test (a context manager).
"""

from __future__ import annotations

import http.client
import random
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class S3FaultProxy:
    def __init__(self, upstream: str, rule=None, max_faults: int = 10_000, timeout: float = 30.0):
        target = urlsplit(upstream)
        assert target.hostname in ("127.0.0.1", "localhost"), "the fault proxy only fronts a local server"
        self.upstream = (target.hostname, target.port)
        self.rule = rule or (lambda method, path, n: None)
        self.max_faults = max_faults
        self.timeout = timeout
        self.requests: Counter = Counter()
        self.faults: Counter = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self):
                body = self._body()
                fault = proxy._decide(self.command, self.path)
                if fault is not None:
                    status, code = fault
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>injected by the test proxy</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=proxy.timeout)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)  # a HEAD's length is the object's, not its empty body's
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _decide(self, method: str, path: str):
        with self._lock:
            self.requests[method] += 1
            if sum(self.faults.values()) >= self.max_faults:
                return None
            fault = self.rule(method, path, self.requests[method])
            if fault is not None:
                self.faults[fault[1]] += 1
            return fault

    def __enter__(self) -> "S3FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def random_faults(rate: float, seed: int = 0, methods=("GET", "HEAD", "PUT")):
    """A rule failing `rate` of the requests at random with throttling and 5xx answers."""
    rng = random.Random(seed)
    kinds = [(503, "SlowDown"), (500, "InternalError"), (503, "ServiceUnavailable")]

    def rule(method, path, n):
        if method in methods and rng.random() < rate:
            return rng.choice(kinds)
        return None

    return rule
