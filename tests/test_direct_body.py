"""Chunk bodies read straight into reused buffers by ``memvault serve``'s own protocol.

Every other end-to-end test drives this path too (they all upload through ``memvault
serve``); these tests aim at the edges of the hand-over between the HTTP parser and the
direct reads: a body that arrives whole with its head, a body cut into tiny pieces, a next
request right behind a body, a response sent before the body was read, and the ASGI path
other servers use.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import SMALL_CHUNKS, LiveServer, _server
from tests.helpers import Api, metric

CHUNK = 256 * 1024  # the module server's chunk size (SMALL_CHUNKS)
BUFFER = 64 * 1024  # its write batch: a chunk's body fills, hands over and refills 4 buffers


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The module's server, with buffers smaller than a chunk: every body here pauses the
    socket when its buffer is full and resumes it once the buffer is written, as a real
    chunk does with the default 2 MiB buffers and 8 MiB chunks."""
    env = {**SMALL_CHUNKS, "MEMVAULT_WRITE_BATCH": str(BUFFER)}
    yield from _server(tmp_path_factory.mktemp("direct"), env)


class Conn:
    """One keep-alive HTTP/1.1 connection on a raw socket: requests go out as the test
    writes them (whole, in pieces, or back to back), responses are read one by one."""

    def __init__(self, server: LiveServer) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        self.token = server.token
        self._buffer = b""

    def head(self, method: str, path: str, length: int | None = None,
             token: str | None = None) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1",
                 f"Authorization: Bearer {token or self.token}"]
        if length is not None:
            lines += ["Content-Type: application/octet-stream", f"Content-Length: {length}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> httpx.Response:
        while b"\r\n\r\n" not in self._buffer:
            self._fill()
        head, _, rest = self._buffer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            self._buffer = rest
            self._fill()
            rest = self._buffer
        self._buffer = rest[length:]
        return httpx.Response(int(lines[0].split(" ")[1]), headers=headers,
                              content=rest[:length])

    def _fill(self) -> None:
        piece = self.sock.recv(1 << 16)
        assert piece, "the server closed the connection"
        self._buffer += piece

    def close(self) -> None:
        self.sock.close()


def _chunk_path(session: dict[str, object], index: int) -> str:
    return f"/v1/uploads/{session['id']}/chunks/{index}"


def _start(api: Api, server: LiveServer, size: int) -> tuple[bytes, dict[str, Any], Conn]:
    """Random data of ``size`` bytes, a session for it and a raw connection."""
    data = os.urandom(size)
    return data, api.session(api.capsule(), size), Conn(server)


def _refused_head(conn: Conn, session: dict[str, object]) -> None:
    """Send the head of chunk 0 with a wrong token: 401 at once, the body not read yet."""
    conn.send(conn.head("PUT", _chunk_path(session, 0), CHUNK, token="mvt_wrong"))
    refused = conn.response()
    assert refused.status_code == 401, refused.text


def _committed(api: Api, session: dict[str, object], data: bytes) -> None:
    """Finish the session: its digest and its stored bytes are the data's."""
    done = api.finish(session, data)
    assert done.status_code == 200, done.text
    assert done.json()["asset"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert api.read(done.json()["memory_id"]).content == data


def test_memvault_serve_reads_chunk_bodies_directly(api: Api, server: LiveServer) -> None:
    direct = metric(server, "memvault_chunk_bodies_total", reader="direct")
    asgi = metric(server, "memvault_chunk_bodies_total", reader="asgi")
    data = os.urandom(3 * CHUNK + 1000)
    done = api.upload(api.capsule(), data, order=[3, 1, 0, 2])
    assert done["asset"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert api.read(done["memory_id"]).content == data
    assert metric(server, "memvault_chunk_bodies_total", reader="direct") == direct + 4
    assert metric(server, "memvault_chunk_bodies_total", reader="asgi") == asgi


@pytest.mark.parametrize("size", [BUFFER - 1, BUFFER, BUFFER + 1, CHUNK + 2 * BUFFER - 1])
def test_bodies_ending_around_a_buffer_boundary(api: Api, server: LiveServer, size: int) -> None:
    data = os.urandom(size)
    done = api.upload(api.capsule(), data)
    assert done["asset"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert api.read(done["memory_id"]).content == data


def test_body_in_the_same_write_as_its_head_then_the_next_request(
    api: Api, server: LiveServer
) -> None:
    data = os.urandom(5000)  # small: the whole body comes in the read that carries the head
    s = api.session(api.capsule(), len(data))
    conn = Conn(server)
    try:
        status = conn.head("GET", f"/v1/uploads/{s['id']}")
        conn.send(conn.head("PUT", _chunk_path(s, 0), len(data)) + data + status)
        put = conn.response()
        assert put.status_code == 200, put.text
        assert put.json()["bytes_received"] == len(data)
        after = conn.response()
        assert after.status_code == 200, after.text
        assert after.json()["received"] == [0]
    finally:
        conn.close()
    _committed(api, s, data)


def test_large_body_then_a_request_right_behind_it(api: Api, server: LiveServer) -> None:
    data, s, conn = _start(api, server, 2 * CHUNK)
    try:
        # Both chunks and a status request in one stream of bytes: each body must end
        # exactly at its Content-Length, and the parser take up the next request there.
        stream = b"".join(
            conn.head("PUT", _chunk_path(s, i), CHUNK) + data[i * CHUNK:(i + 1) * CHUNK]
            for i in (1, 0)
        ) + conn.head("GET", f"/v1/uploads/{s['id']}")
        conn.send(stream)
        for _ in (1, 0):
            r = conn.response()
            assert r.status_code == 200, r.text
        status = conn.response()
        assert status.json()["received"] == [0, 1]
    finally:
        conn.close()
    _committed(api, s, data)


def test_body_trickled_in_tiny_pieces(api: Api, server: LiveServer) -> None:
    rng = random.Random(7)
    data, s, conn = _start(api, server, 2 * CHUNK)
    try:
        for index in (0, 1):
            body = data[index * CHUNK:(index + 1) * CHUNK]
            payload = conn.head("PUT", _chunk_path(s, index), CHUNK) + body
            at = 0
            while at < len(payload):  # cut anywhere, the head included
                step = rng.choice((1, 7, 500, 4096, 70_000))
                conn.send(payload[at:at + step])
                at += step
                if rng.random() < 0.05:
                    time.sleep(0.002)
            r = conn.response()
            assert r.status_code == 200, r.text
    finally:
        conn.close()
    _committed(api, s, data)


def test_refused_before_the_body_is_read_and_the_connection_goes_on(
    api: Api, server: LiveServer
) -> None:
    data, s, conn = _start(api, server, CHUNK)
    try:
        # A wrong token: answered from the head alone, before the body is sent at all.
        _refused_head(conn, s)
        # The body still comes (a client may send it regardless); it is read and dropped,
        # and the next request on the connection is understood.
        conn.send(data)
        conn.send(conn.head("PUT", _chunk_path(s, 0), CHUNK) + data)
        r = conn.response()
        assert r.status_code == 200, r.text
        assert r.json()["duplicate"] is False
        # Different bytes at a received index: read to the end, compared, refused.
        other = os.urandom(CHUNK)
        conn.send(conn.head("PUT", _chunk_path(s, 0), CHUNK) + other)
        assert conn.response().status_code == 409
        conn.send(conn.head("GET", f"/v1/uploads/{s['id']}"))
        assert conn.response().json()["received"] == [0]
    finally:
        conn.close()
    _committed(api, s, data)


def test_expect_100_continue_is_answered_when_the_route_asks(
    api: Api, server: LiveServer
) -> None:
    # curl sends "Expect: 100-continue" with any body over 1 MiB.
    direct = metric(server, "memvault_chunk_bodies_total", reader="direct")
    data, s, conn = _start(api, server, CHUNK)
    try:
        head = conn.head("PUT", _chunk_path(s, 0), CHUNK)
        conn.send(head[:-2] + b"Expect: 100-continue\r\n\r\n")
        interim = conn.sock.recv(1 << 16)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
        conn.send(data)
        r = conn.response()
        assert r.status_code == 200, r.text
        # Refused before the client was told to go on: it may never send the body, so the
        # server cannot tell what follows from the body; it answers and hangs up.
        head = conn.head("PUT", _chunk_path(s, 0), CHUNK, token="mvt_wrong")
        conn.send(head[:-2] + b"Expect: 100-continue\r\n\r\n")
        refused = conn.response()
        assert refused.status_code == 401
        assert refused.headers["connection"] == "close"
        conn.sock.settimeout(2)
        assert conn.sock.recv(1) == b""
    finally:
        conn.close()
    assert metric(server, "memvault_chunk_bodies_total", reader="direct") == direct + 1
    _committed(api, s, data)


def test_a_body_still_arriving_after_an_early_answer_keeps_the_connection(
    api: Api, server: LiveServer
) -> None:
    # uvicorn arms its keep-alive timer (5 s) when a response is complete. A slow client
    # still sending the body of a refused chunk is not idle: it must not be cut off.
    data, s, conn = _start(api, server, CHUNK)
    try:
        _refused_head(conn, s)
        pieces = 14
        step = -(-CHUNK // pieces)
        for at in range(0, CHUNK, step):  # 6.5 s in all, longer than the keep-alive
            conn.send(data[at:at + step])
            time.sleep(0.5)
        conn.send(conn.head("GET", f"/v1/uploads/{s['id']}"))
        status = conn.response()
        assert status.status_code == 200, status.text
        assert status.json()["received"] == []
    finally:
        conn.close()


def test_a_refused_body_longer_than_any_chunk_is_not_drained(
    api: Api, server: LiveServer
) -> None:
    s = api.session(api.capsule(), CHUNK)
    too_long = 128 * 1024 * 1024  # twice MEMVAULT_MAX_CHUNK_SIZE's default
    conn = Conn(server)
    try:
        conn.send(conn.head("PUT", _chunk_path(s, 0), too_long) + os.urandom(4096))
        refused = conn.response()
        assert refused.status_code == 413, refused.text
        assert refused.headers["connection"] == "close"
        # The rest (~128 MiB) would only be read and thrown away: the server hangs up at once
        # (not after the 5 s keep-alive timeout of an idle connection).
        conn.sock.settimeout(2)
        assert conn.sock.recv(1) == b""
    finally:
        conn.close()
    r = api.put(s, 0, os.urandom(CHUNK))  # the session is untouched and usable
    assert r.status_code == 200, r.text


def test_a_refused_body_that_stops_coming_is_an_idle_connection(
    api: Api, server: LiveServer
) -> None:
    data, s, conn = _start(api, server, CHUNK)
    try:
        _refused_head(conn, s)
        conn.send(data[:1000])  # then nothing: closed like any idle keep-alive connection
        conn.sock.settimeout(15)
        started = time.monotonic()
        assert conn.sock.recv(1) == b""
        assert time.monotonic() - started < 10
    finally:
        conn.close()
