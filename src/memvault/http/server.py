"""Running the app: uvicorn with httptools, and memvault's own protocol on top of it.

The protocol adds two things to uvicorn's ``HttpToolsProtocol``:

- **A header timeout.** uvicorn bounds idle keep-alive connections but not a request whose
  headers arrive slowly: a client can hold a connection open for ever by sending a header
  byte now and then (slowloris). A timer armed when a request's first byte is parsed (or the
  connection opens) closes the connection if its headers are not complete in time.
- **A bound on a request's head.** httptools gathers a header of any length, so a client
  could make the server hold megabytes per connection until the header timeout. Once more
  than ``MAX_HEAD_BYTES`` arrive after a request's first read with its head still
  incomplete, the answer is 431 ``headers_too_large`` and the connection closes.
- **Chunk bodies read straight into reused buffers** (``memvault.http.direct``). The
  protocol is an ``asyncio.BufferedProtocol``: the loop reads into a buffer the protocol
  hands it. For everything but a chunk body that is a small scratch buffer fed to the
  parser (as uvicorn's ``data_received`` would be). For a chunk ``PUT`` with a
  ``Content-Length``, once the head is parsed the body's bytes bypass the parser (a client
  that sent ``Expect: 100-continue`` is told to go on when the route asks): they are
  read into pooled buffers of the route's ``DirectBody`` (never past the body's end), and
  when the last byte is in, a fresh parser takes the connection's next request.

It hooks the parser callbacks httptools defines and uvicorn's per-request cycle, which is
why the uvicorn version range is pinned.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from http import HTTPStatus
from typing import Any, cast

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from memvault.errors import HeadersTooLarge, InvalidArgument, MemvaultError
from memvault.http.direct import CHUNK_PATH, EXTENSION, BufferPool, DirectBody
from memvault.settings import Settings

SCRATCH_BYTES = 64 * 1024
"""One socket read of anything but a chunk body (uvicorn's own flow-control limit)."""
MAX_HEAD_BYTES = 64 * 1024
"""Bytes a request's head may still take after the read it began in (so at most ~128 KiB in
all; nginx's default is 32 KiB)."""
POOL_KEEP_BYTES = 32 * 1024 * 1024
"""Chunk buffers kept for reuse once free: 16 chunks in flight with the default write batch."""


def memvault_protocol(settings: Settings) -> type[asyncio.BaseProtocol]:
    pool = BufferPool(settings.write_batch, max(1, POOL_KEEP_BYTES // settings.write_batch))
    header_timeout = settings.header_timeout
    # One for all connections, as uvloop's own read buffer is: whatever is read into it is
    # copied out (or dropped) before the next read anywhere.
    scratch = memoryview(bytearray(SCRATCH_BYTES))
    # A body longer than any chunk may be is refused and not read to its end: the connection
    # closes once the answer is out (uvicorn would read and drop it all).
    drain_limit = settings.max_chunk_size

    class MemvaultProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def __init__(self, config: Config, server_state: ServerState,
                     app_state: dict[str, Any],
                     _loop: asyncio.AbstractEventLoop | None = None) -> None:
            super().__init__(config, server_state, app_state, _loop)
            self._direct: DirectBody | None = None
            """The current request's chunk body while bytes of it are due from the socket."""
            self._into: DirectBody | None = None  # where the read under way goes
            self._head_bytes: int | None = None  # read since the head began; None: no head due
            self._in_message = False  # the parser is inside a request (head or body)
            self._unupgraded: bytes | None = None
            """The head of a request that asked for an Upgrade, without that header."""
            self._refused: MemvaultError | None = None
            """A request the parser could not read, answered once those before it are."""

        # -- reads into our buffers (through ``MemvaultConnection``) -------------------------

        def get_buffer(self, sizehint: int) -> memoryview:
            body = self._direct
            if body is not None and body.due:
                self._into = body
                return body.space()
            self._into = None
            return scratch

        def buffer_updated(self, nbytes: int) -> None:
            body = self._into
            if body is None:
                if self._head_bytes is not None:
                    self._head_bytes += nbytes
                    if self._head_bytes > MAX_HEAD_BYTES:
                        self._refuse_head()
                        return
                self.data_received(bytes(scratch[:nbytes]))
                self._rearm_if_idle()
                return
            # Bytes arrived: the connection is not idle (a body still coming after an early
            # answer must not be cut by the keep-alive timer that answer armed).
            self._unset_keepalive_if_required()
            if body.received(nbytes):
                # The parser saw only the head (and maybe a first piece of the body); the
                # next request starts afresh.
                self._direct = None
                self._in_message = False
                self.parser = _parser(self)
            if self.cycle.response_complete:
                self._idle()  # from the last byte of a refused body: one that stops coming
                # is an idle connection like any other

        def _idle(self) -> None:
            """Arm the keep-alive timer, as uvicorn does once a response is complete."""
            if not self.transport.is_closing() and not self.pipeline:
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler)

        # -- header timeout ----------------------------------------------------------------

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()
            self._head_bytes = 0  # counted from the next read on
            self._in_message = True

        def on_message_complete(self) -> None:
            if self._unupgraded is not None:
                return  # parsed again without its Upgrade (``data_received``)
            self._in_message = False
            self._disarm()  # a request's body is in: from here on its answer is ours to give
            super().on_message_complete()

        def _rearm_if_idle(self) -> None:
            """Bytes that begin no request (the CRLFs the parser skips between requests)
            cancelled the keep-alive timer (uvicorn does on every read) and armed nothing: a
            client could hold the connection for ever with one CRLF after each answer."""
            if (not self._in_message and self.timeout_keep_alive_task is None
                    and self._refused is None
                    and (self.cycle is None or self.cycle.response_complete)):
                self._idle()

        def _refuse_head(self) -> None:
            self._disarm()
            self._head_bytes = None
            if self.transport.is_closing():
                return
            self._answer_and_close(HeadersTooLarge(
                f"the request's head is longer than this server takes ({MAX_HEAD_BYTES} bytes "
                "after its first read)", limit=MAX_HEAD_BYTES))

        def send_400_response(self, msg: str) -> None:
            """What the parser could not read (uvicorn answers text/plain at once, cutting
            off the answer of a request before it): a problem document like every other
            answer, after those of the requests before it, then the connection closes (what
            follows cannot be told apart from the broken request)."""
            self._refuse(InvalidArgument(
                f"the request is not valid HTTP/1.1 ({msg.rstrip('.')}); if it came after "
                "another request on this connection, that one's body may have been longer "
                "than its Content-Length"))

        def _refuse(self, error: MemvaultError) -> None:
            self._disarm()
            self._head_bytes = None
            if self.pipeline or (self.cycle is not None and not self.cycle.response_complete):
                self._refused = error
                self.flow.pause_reading()
                return
            self._answer_and_close(error)

        def data_received(self, data: bytes) -> None:
            """uvicorn's, but an ``Upgrade`` is ignored (RFC 9110 §7.8 lets a server):
            memvault switches to no other protocol, and the parser would take everything
            after the head, body included, for the new one (``curl --http2`` on http://
            asks for h2c with every request: its chunk bodies were lost)."""
            if self._refused is not None:  # past a request it could not read, the parser
                return  # is lost
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)  # as uvicorn logs it
                self.send_400_response(msg)
            except httptools.HttpParserUpgrade as upgrade:
                head, self._unupgraded = self._unupgraded, None
                if head is None:  # CONNECT: nothing to take away that would make it HTTP
                    self._refuse(InvalidArgument(
                        "this server switches to no other protocol (CONNECT, Upgrade)"))
                    return
                # The same head without its Upgrade header, and what followed it, again.
                self.parser = _parser(self)
                self.data_received(head + data[upgrade.args[0]:])

        def _head_without_upgrade(self) -> bytes:
            version = self.parser.get_http_version().encode()
            lines = [self.parser.get_method() + b" " + self.url + b" HTTP/" + version]
            lines += [name + b": " + value for name, value in self.headers
                      if name != b"upgrade"]
            return b"\r\n".join(lines) + b"\r\n\r\n"

        def on_response_complete(self) -> None:
            if self._refused is not None and not self.pipeline:
                self.server_state.total_requests += 1
                self._answer_and_close(self._refused)
                return
            super().on_response_complete()

        def _answer_and_close(self, error: MemvaultError) -> None:
            body = json.dumps(error.to_problem()).encode()
            self.transport.write(
                f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n".encode()
                + b"content-type: application/problem+json\r\n"
                b"connection: close\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            self.transport.close()

        def end_of_input(self) -> bool | None:
            """The client shut its side (``shutdown(SHUT_WR)``: it has sent all it will). A
            request wholly received still gets its answer, then the connection closes (True:
            keep the transport open for writing); otherwise the connection ends as lost."""
            cycle = self.cycle
            if (self._in_message or self._direct is not None or cycle is None
                    or cycle.response_complete or self.transport.is_closing()):
                return None
            cycle.keep_alive = False
            self.pipeline.clear()  # nothing after the answer is served
            return True

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._direct is not None:
                self._direct.lost()
                self._direct = None
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        # -- chunk bodies ------------------------------------------------------------------

        def on_headers_complete(self) -> None:
            if self.parser.should_upgrade() and any(
                    name == b"upgrade" for name, _ in self.headers):
                # Not served as it stands: the parser stops here, and ``data_received``
                # parses the head again without the header.
                self._unupgraded = self._head_without_upgrade()
                return
            self._head_bytes = None
            if self.parser.get_http_version() == "1.0":
                # RFC 9110 §10.1.1: an HTTP/1.0 client's expectation is ignored (and it
                # must never be sent a 1xx).
                self.expect_100_continue = False
            queued = self.cycle is not None and not self.cycle.response_complete
            super().on_headers_complete()
            if queued or CHUNK_PATH.match(self.scope.get("path", "")):
                # A chunk body has its own pace (``MEMVAULT_MIN_TRANSFER_RATE``); any other
                # request's body (small JSON) must be in within the header timeout too, or
                # a client could hold the connection, unauthenticated, by never sending it.
                # (Not a pipelined one: its body is read only once the request before it is
                # answered, however long that takes.)
                self._disarm()
            length = None if queued else self._direct_length()
            if length:
                self._start_direct(length)
            elif self.expect_100_continue:
                self._close_if_answered_before_continue()

        def _close_if_answered_before_continue(self) -> None:
            """A client waiting for "100 Continue" and answered first (an error before the
            body was asked for) may send its body after all, or never: what follows could
            not be told from it, so the connection closes after the answer (as a direct
            body's does; uvicorn kept it, and read the next request as body)."""
            cycle = self.cycle
            send = cycle.send

            async def answer(message: Any) -> None:
                if not cycle.response_started and cycle.waiting_for_100_continue:
                    cycle.keep_alive = False
                await send(message)

            cycle.send = answer  # type: ignore[method-assign]

        def on_body(self, body: bytes) -> None:
            if self._direct is not None:
                self._direct.early(body)  # came in the same read as the head
                if not self._direct.due:
                    self._direct = None  # all of it: the parser carries on by itself
                return
            super().on_body(body)

        def _direct_length(self) -> int | None:
            """The body's length if this request's body is to be read directly."""
            scope = self.scope
            if (scope.get("method") != "PUT" or "path" not in scope
                    or not CHUNK_PATH.match(scope["path"]) or self.parser.should_upgrade()):
                return None
            lengths = [v.strip(b" \t") for k, v in self.headers if k == b"content-length"]
            if (len(lengths) != 1 or not lengths[0].isdigit()
                    or any(k == b"transfer-encoding" for k, _ in self.headers)):
                return None  # the route refuses it with the right error
            return int(lengths[0])

        def _start_direct(self, length: int) -> None:
            cycle = self.cycle
            keep_alive = cycle.keep_alive
            if length > drain_limit or self.expect_100_continue:
                # An answer closes the connection (and says so): a body longer than any
                # chunk is refused for sure and not worth reading to its end; a client
                # waiting for "100 Continue" may never send its body, so what follows an
                # answer could not be told from it.
                cycle.keep_alive = False

            def proceed() -> None:
                """The route asks for the body: a client waiting for "100 Continue" gets it
                now (uvicorn sends it on the first ``receive``)."""
                if cycle.waiting_for_100_continue and not self.transport.is_closing():
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    cycle.waiting_for_100_continue = False
                    cycle.keep_alive = keep_alive and length <= drain_limit

            body = DirectBody(length, pool, self._pause, self._resume, scratch, proceed)
            extensions: dict[str, Any] = dict(self.scope.get("extensions") or {})
            extensions[EXTENSION] = body
            self.scope["extensions"] = extensions
            answered = cycle.on_response

            def response_sent() -> None:
                body.response_sent()  # what is still due is read and dropped
                answered()

            cycle.on_response = response_sent
            self._direct = body

        def _pause(self) -> None:
            if not self.transport.is_closing():
                self.flow.pause_reading()

        def _resume(self) -> None:
            # Not while uvicorn holds reading for a pipelined request of its own.
            if not self.transport.is_closing() and not self.pipeline:
                self.flow.resume_reading()

    class MemvaultConnection(asyncio.BufferedProtocol):
        """What the event loop talks to. uvloop reads into a protocol's buffers only if the
        protocol is not an ``asyncio.Protocol``, and uvicorn's is; so the loop gets this
        ``BufferedProtocol``, which passes everything on to the HTTP protocol."""

        def __init__(self, config: Config, server_state: ServerState,
                     app_state: dict[str, Any],
                     _loop: asyncio.AbstractEventLoop | None = None) -> None:
            self.http = MemvaultProtocol(config, server_state, app_state, _loop)

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.http.connection_made(transport)  # type: ignore[arg-type]

        def connection_lost(self, exc: Exception | None) -> None:
            self.http.connection_lost(exc)

        def eof_received(self) -> bool | None:
            return self.http.end_of_input()

        def pause_writing(self) -> None:
            self.http.pause_writing()

        def resume_writing(self) -> None:
            self.http.resume_writing()

        def get_buffer(self, sizehint: int) -> memoryview:
            return self.http.get_buffer(sizehint)

        def buffer_updated(self, nbytes: int) -> None:
            self.http.buffer_updated(nbytes)

    return MemvaultConnection


def _parser(protocol: HttpToolsProtocol) -> httptools.HttpRequestParser:
    parser = httptools.HttpRequestParser(protocol)
    # As uvicorn sets it: a response to the first of pipelined requests still goes out.
    with contextlib.suppress(AttributeError):  # httptools < 0.6.3
        parser.set_dangerous_leniencies(lenient_data_after_close=True)
    return parser


def run(app: Any, settings: Settings) -> None:
    import uvicorn

    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        # A class uvicorn builds each connection's protocol from, as it does its own.
        http=cast("type[asyncio.Protocol]", memvault_protocol(settings)),
        loop="uvloop",
        ws="none",  # memvault has no WebSocket routes: an upgrade is never taken
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
    )
