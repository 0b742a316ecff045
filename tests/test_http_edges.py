"""HTTP/1.1 at its edges, on raw sockets against ``memvault serve``: what a review of the
protocol layer found holding connections with no timer, answers lost or sent wrong. Each
test failed before its fix (docs/decisions.md, "The HTTP layer's edges")."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SMALL_CHUNKS, LiveServer, _server
from tests.helpers import Api, read_all
from tests.test_direct_body import Conn

HEADER_TIMEOUT = 2.0
KEEP_ALIVE = 5.0  # uvicorn's default, which memvault serve keeps


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    env = {**SMALL_CHUNKS, "MEMVAULT_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
           "MEMVAULT_MIN_TRANSFER_RATE": "1000000", "MEMVAULT_TRANSFER_GRACE": "1"}
    yield from _server(tmp_path_factory.mktemp("edges"), env)


@pytest.fixture
def conn(server: LiveServer) -> Iterator[Conn]:
    conn = Conn(server)
    try:
        yield conn
    finally:
        conn.close()


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Read (and drop) until the server closes the connection; how long that took. Fails if
    it is still open after ``seconds``."""
    sock.settimeout(seconds)
    started = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        pytest.fail(f"the connection was still open after {seconds} s")
    return time.monotonic() - started


def test_a_crlf_after_an_answer_leaves_the_connection_idle_not_held(conn: Conn) -> None:
    """The parser skips CRLFs between requests without starting one; uvicorn cancelled the
    keep-alive timer on reading them and nothing armed another: one CRLF after each answer
    held a connection for ever."""
    conn.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert conn.response().status_code == 200
    conn.send(b"\r\n")
    assert closed_within(conn.sock, KEEP_ALIVE + 10) >= KEEP_ALIVE - 1


def test_a_json_body_that_never_comes_is_cut_off_with_the_head_timer(
        server: LiveServer) -> None:
    """A POST whose small body never arrives held its connection for ever, without a token
    (FastAPI reads the body before authentication). Outside chunk bodies (which have their
    own pace) a request must be in whole within the header timeout."""
    for token in ("", f"Authorization: Bearer {server.token}\r\n"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(f"POST /v1/capsules HTTP/1.1\r\nHost: 127.0.0.1\r\n{token}"
                         "Content-Type: application/json\r\nContent-Length: 20\r\n\r\n{\"na"
                         .encode())
            assert closed_within(sock, HEADER_TIMEOUT + 10) < HEADER_TIMEOUT + 5


def test_a_client_that_shuts_its_side_after_a_request_gets_the_answer(
        api: Api, server: LiveServer) -> None:
    """``shutdown(SHUT_WR)`` after a whole request (netcat, some HTTP/1.0 clients): the
    transport was closed on the EOF, so the chunk was stored and its 200 never sent."""
    data = os.urandom(300_000)
    session = api.session(api.capsule(), len(data))
    chunk = data[:session["chunk_size"]]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"PUT /v1/uploads/{session['id']}/chunks/0 HTTP/1.1\r\n"
                     f"Host: 127.0.0.1\r\nAuthorization: Bearer {server.token}\r\n"
                     f"Content-Length: {len(chunk)}\r\n\r\n".encode() + chunk)
        sock.shutdown(socket.SHUT_WR)
        answer = read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert b"connection: close" in head.lower()
    assert json.loads(body)["received_count"] == 1
    # And a JSON request through ASGI.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        payload = b'{"name": "half-closed"}'
        sock.sendall(b"POST /v1/capsules HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     + f"Authorization: Bearer {server.token}\r\n".encode()
                     + b"Content-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock).startswith(b"HTTP/1.1 201 ")


def test_a_body_cut_off_by_the_clients_shutdown_is_not_counted(
        api: Api, server: LiveServer) -> None:
    data = os.urandom(300_000)
    session = api.session(api.capsule(), len(data))
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"PUT /v1/uploads/{session['id']}/chunks/0 HTTP/1.1\r\n"
                     f"Host: 127.0.0.1\r\nAuthorization: Bearer {server.token}\r\n"
                     f"Content-Length: {session['chunk_size']}\r\n\r\n".encode() + data[:1000])
        sock.shutdown(socket.SHUT_WR)
        closed_within(sock, 15)
    deadline = time.monotonic() + 10
    while api.http.get(f"/v1/uploads/{session['id']}").json()["received"]:
        assert time.monotonic() < deadline, "a cut body was counted"
        time.sleep(0.1)


def test_content_length_with_whitespace_around_it_is_a_length(
        api: Api, server: LiveServer, conn: Conn) -> None:
    """RFC 9110 §5.5: whitespace around a field value is not part of it. The parser read
    such a body, and the chunk route then refused the header."""
    data = os.urandom(1000)
    session = api.session(api.capsule(), len(data))
    conn.send(f"PUT /v1/uploads/{session['id']}/chunks/0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
              f"Authorization: Bearer {server.token}\r\nContent-Length: {len(data)} \t\r\n\r\n"
              .encode() + data)
    answer = conn.response()
    assert answer.status_code == 200, answer.text
    assert api.finish(session, data).status_code == 200


def test_a_timeout_answer_closes_the_connection(api: Api, conn: Conn) -> None:
    """After a 408 for a body that stopped coming, the rest of that body may still arrive:
    the connection closes (with ``Connection: close``) instead of reading the client's next
    request as body bytes."""
    data = os.urandom(600_000)
    session = api.session(api.capsule(), len(data))
    conn.send(conn.head("PUT", f"/v1/uploads/{session['id']}/chunks/0", session["chunk_size"])
              + data[:1000])
    answer = conn.response()
    assert answer.status_code == 408, answer.text
    assert answer.headers.get("connection") == "close"
    closed_within(conn.sock, 10)


def test_an_http_1_0_client_is_never_sent_100_continue(api: Api, server: LiveServer) -> None:
    """RFC 9110 §10.1.1 and §15.2: an HTTP/1.0 request's ``Expect`` is ignored, and such a
    client is never sent a 1xx."""
    data = os.urandom(1000)
    session = api.session(api.capsule(), len(data))
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"PUT /v1/uploads/{session['id']}/chunks/0 HTTP/1.0\r\n"
                     f"Host: 127.0.0.1\r\nAuthorization: Bearer {server.token}\r\n"
                     f"Expect: 100-continue\r\nContent-Length: {len(data)}\r\n\r\n".encode())
        time.sleep(0.5)
        sock.sendall(data)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert b"100 Continue" not in answer


def test_an_upgrade_is_ignored_and_the_body_is_the_requests(
        api: Api, server: LiveServer, conn: Conn) -> None:
    """``curl --http2`` on http:// asks for h2c with every request (``Connection: Upgrade,
    HTTP2-Settings``, ``Upgrade: h2c``). The parser took everything after the head for the
    new protocol, so a chunk's body was lost ("body ended after 0 of its 1000 bytes"), and a
    WebSocket upgrade carrying a body hung. memvault switches to no other protocol: the
    Upgrade is ignored (RFC 9110 §7.8) and the request is served as HTTP/1.1."""
    data = os.urandom(1000)
    session = api.session(api.capsule(), len(data))
    conn.send(f"PUT /v1/uploads/{session['id']}/chunks/0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
              f"Authorization: Bearer {server.token}\r\n"
              "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
              "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    stored = conn.response()
    assert stored.status_code == 200, stored.text
    assert stored.json()["received_count"] == 1
    # The connection goes on: a WebSocket upgrade with a body, and a request behind it.
    conn.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
              b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              b"Sec-WebSocket-Version: 13\r\nContent-Length: 10\r\n\r\n0123456789"
              b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert conn.response().status_code == 200
    assert conn.response().status_code == 200
    done = api.finish(session, data)
    assert done.status_code == 200, done.text


def test_405_names_head_beside_get_and_404_does_not_echo_a_huge_path(conn: Conn) -> None:
    conn.send(b"DELETE /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    refused = conn.response()
    assert refused.status_code == 405
    assert refused.headers["allow"] == "GET, HEAD"
    assert refused.json()["allow"] == ["GET", "HEAD"]
    conn.send(b"GET /" + b"x" * 60_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    missing = conn.response()
    assert missing.status_code == 404
    assert len(missing.content) < 1000


def test_an_answer_before_100_continue_closes_the_connection(
        api: Api, server: LiveServer) -> None:
    """A chunk sent chunked (no Content-Length) with ``Expect: 100-continue`` is refused
    before its body is asked for; the client may still send that body, so the connection
    closes after the answer. It stayed open, and the next request was read as body."""
    session = api.session(api.capsule(), 1000)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"PUT /v1/uploads/{session['id']}/chunks/0 HTTP/1.1\r\n"
                     f"Host: 127.0.0.1\r\nAuthorization: Bearer {server.token}\r\n"
                     "Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n".encode())
        answer = read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert b"connection: close" in head.lower()
    assert json.loads(body)["code"] == "invalid_argument"


def test_a_request_cut_by_a_shutdown_is_told_to_come_back(tmp_path: Path) -> None:
    """SIGTERM with a chunk still arriving: uvicorn waits 10 s, then cancels the request.
    It logged the cancellation's traceback ("Exception in ASGI application") and answered a
    text/plain 500; the client gets a 503 problem with ``Retry-After`` instead."""
    server = LiveServer(tmp_path / "data",
                        env={**SMALL_CHUNKS, "MEMVAULT_MIN_TRANSFER_RATE": "0"})
    server.start()
    try:
        api = server.api()
        data = os.urandom(300_000)
        session = api.session(api.capsule(), len(data))
        api.http.close()
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(f"PUT /v1/uploads/{session['id']}/chunks/0 HTTP/1.1\r\n"
                         f"Host: 127.0.0.1\r\nAuthorization: Bearer {server.token}\r\n"
                         f"Content-Length: {session['chunk_size']}\r\n\r\n".encode()
                         + data[:1000])  # and then nothing more
            time.sleep(0.5)
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            answer = read_all(sock)
        server.proc.wait(timeout=60)
    finally:
        server.kill()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), answer[:300]
    assert b"retry-after: 1" in head.lower()
    assert json.loads(body)["code"] == "unavailable"
    assert server.log_path is not None
    log = server.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "request.cut_by_shutdown" in log
