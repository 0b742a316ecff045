"""Faults between the SDK and a server: an httpx transport wrapper (in-process tests) and a
loopback HTTP proxy (tests against a live server process).

Both take a ``rule``: called with each request (method, path, how many requests with that
method and path came before), it returns a ``Fault`` to inject or None to pass the request
through untouched. Faults are answers a real network or proxy produces: a memvault problem
with a status and ``Retry-After``, a foreign error page, a refused or reset connection, or an
answer lost after the server acted on the request.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn


@dataclass(frozen=True)
class Fault:
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    """None: a memvault problem document for ``status``."""
    drop_before: bool = False
    """The connection breaks before the request reaches the server."""
    drop_after: bool = False
    """The server handles the request, then the connection breaks before its answer."""

    def response_body(self) -> bytes:
        if self.body is not None:
            return self.body
        code = {503: "unavailable", 429: "resource_exhausted", 500: "internal",
                408: "timeout", 507: "insufficient_storage"}.get(self.status, "internal")
        return json.dumps({"type": "about:blank", "title": "injected", "status": self.status,
                           "code": code, "detail": f"injected {self.status} by the test"}
                          ).encode()

    def content_type(self) -> str:
        return "application/problem+json" if self.body is None else "text/html"


Rule = Callable[[str, str, int], Fault | None]


def unavailable(retry_after: int = 0) -> Fault:
    return Fault(503, {"Retry-After": str(retry_after)})


def chunk_faults(fault: Fault, *, every: int = 2, times: int = 1) -> Rule:
    """``fault`` for the first ``times`` sends of every ``every``-th chunk index."""
    def rule(method: str, path: str, seen: int) -> Fault | None:
        if method == "PUT" and "/chunks/" in path:
            index = int(path.rsplit("/", 1)[1])
            if index % every == 0 and seen < times:
                return fault
        return None
    return rule


@dataclass
class Log:
    seen: Counter[tuple[str, str]] = field(default_factory=Counter)
    injected: list[tuple[str, str, int]] = field(default_factory=list)
    passed: list[tuple[str, str]] = field(default_factory=list)

    def count(self, method: str, fragment: str = "") -> int:
        return sum(1 for m, p in self.passed if m == method and fragment in p)


class FaultTransport(httpx.AsyncBaseTransport):
    """Wraps a transport (e.g. ``httpx.ASGITransport``) and injects faults by ``rule``."""

    def __init__(self, inner: httpx.AsyncBaseTransport, rule: Rule | None = None) -> None:
        self.inner = inner
        self.rule = rule
        self.log = Log()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        key = (request.method, request.url.path)
        seen = self.log.seen[key]
        self.log.seen[key] += 1
        fault = self.rule(*key, seen) if self.rule else None
        if fault is None or fault.drop_after:
            self.log.passed.append(key)
            response = await self.inner.handle_async_request(request)
            if fault is None:
                return response
            await response.aread()
            self.log.injected.append((*key, 0))
            raise httpx.ReadError("connection reset (injected after the server answered)")
        self.log.injected.append((*key, fault.status))
        if fault.drop_before:
            raise httpx.ConnectError("connection refused (injected)")
        return httpx.Response(fault.status, headers={
            "content-type": fault.content_type(), **fault.headers}, content=fault.response_body())


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that answers with ``rule``'s faults
    (status faults only: a broken connection is tested against the server process itself,
    by killing it). Runs uvicorn on its own thread and event loop; bodies are forwarded whole
    (test chunks are small). ``with FaultProxy(url, rule) as proxy: ... proxy.url``.
    """

    def __init__(self, upstream: str, rule: Rule | None = None) -> None:
        self.upstream = upstream
        self.rule = rule
        self.log = Log()
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        with self._lock:
            seen = self.log.seen[(method, path)]
            self.log.seen[(method, path)] += 1
        fault = self.rule(method, path, seen) if self.rule else None
        if fault is not None:
            assert not fault.drop_before, "the proxy injects statuses only"
            assert not fault.drop_after, "the proxy injects statuses only"
            self.log.injected.append((method, path, fault.status))
            status, payload = fault.status, fault.response_body()
            headers = [(b"content-type", fault.content_type().encode()),
                       *((k.encode(), v.encode()) for k, v in fault.headers.items())]
        else:
            self.log.passed.append((method, path))
            query = scope.get("query_string") or b""
            url = self.upstream + path + (f"?{query.decode()}" if query else "")
            forward = [(k, v) for k, v in scope["headers"]
                       if k.lower() not in (b"host", b"content-length", b"connection")]
            async with httpx.AsyncClient(timeout=120) as client:
                answer = await client.request(method, url, content=body, headers=forward)
            status, payload = answer.status_code, answer.content
            headers = [(k.encode(), v.encode()) for k, v in answer.headers.items()
                       if k.lower() not in ("content-length", "transfer-encoding",
                                            "connection", "content-encoding")]
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def start(self) -> None:
        config = uvicorn.Config(self._app, host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="off", access_log=False,
                                interface="asgi3")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        ready = threading.Event()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("fault proxy did not start")
            ready.wait(0.02)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=30)

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def proxy(upstream: str, rule: Rule | None = None) -> Iterator[FaultProxy]:
    with FaultProxy(upstream, rule) as p:
        yield p



class TcpProxy:
    """A TCP forwarder on 127.0.0.1 in front of ``upstream`` (e.g. PostgreSQL). ``cut()``
    drops every connection and refuses new ones, as a network partition or a database
    restart would; ``restore()`` listens again on the same port."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            doomed = list(self._open)
            self._open.clear()
            listener, self._listener = self._listener, None
        for s in [*doomed, *([listener] if listener else [])]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                # A connection accepted just before a cut must not outlive it.
                live = self._listener is listener
                if live:
                    self._open.update((client, server))
            if not live:
                client.close()
                server.close()
                continue
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def tcp_proxy(host: str, port: int) -> Iterator[TcpProxy]:
    proxy = TcpProxy(host, port)
    proxy.restore()
    try:
        yield proxy
    finally:
        proxy.cut()
