"""Limits against a live server: transfer slots, slow bodies, quotas, JSON size, full disk.

Each limit is hit and the response a user sees is checked (status, code, the numbers,
``Retry-After``); then the condition passes and the same request succeeds. Slots are read
back from ``/metrics`` after every way a transfer can end, to show none leaks.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from memvault.http.server import MAX_HEAD_BYTES
from tests.conftest import SMALL_CHUNKS, LiveServer
from tests.helpers import Api, metric, mint_token, problem, read_all

CHUNK = 256 * 1024
Connect = Callable[..., Api]


class RawPut:
    """A chunk PUT on a raw socket, so a test can stall or abandon the body half-way."""

    def __init__(self, server: LiveServer, token: str, session_id: str, index: int,
                 length: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        head = (
            f"PUT /v1/uploads/{session_id}/chunks/{index} HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
        )
        self.sock.sendall(head.encode())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> tuple[int, bytes]:
        """Status and body of the response (the headers are not needed here)."""
        data = b""
        while b"\r\n\r\n" not in data:
            piece = self.sock.recv(65536)
            if not piece:
                break
            data += piece
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            piece = self.sock.recv(65536)
            if not piece:
                break
            body += piece
        return int(head.split(b" ", 2)[1]), body

    def close(self) -> None:
        self.sock.close()


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


@pytest.fixture
def connect() -> Iterator[Connect]:
    """``connect(server, token=None)``: an API client, closed when the test ends."""
    clients: list[Api] = []

    def make(server: LiveServer, token: str | None = None) -> Api:
        clients.append(server.api(token))
        return clients[-1]

    yield make
    for client in clients:
        client.http.close()


RawPuts = Callable[[LiveServer, str, str, int, int], RawPut]


@pytest.fixture
def raw_put() -> Iterator[RawPuts]:
    """``raw_put(server, token, session_id, index, length)``: sockets closed when the test ends."""
    puts: list[RawPut] = []

    def make(server: LiveServer, token: str, session_id: str, index: int, length: int) -> RawPut:
        puts.append(RawPut(server, token, session_id, index, length))
        return puts[-1]

    yield make
    for put in puts:
        put.close()


def start_limited(tmp_path: Path, grace: int) -> LiveServer:
    """Three transfer slots, two per principal, 64 KiB/s minimum after ``grace`` seconds."""
    env = {**SMALL_CHUNKS, "MEMVAULT_TRANSFER_SLOTS": "3",
           "MEMVAULT_TRANSFER_SLOTS_PER_PRINCIPAL": "2",
           "MEMVAULT_MIN_TRANSFER_RATE": str(64 * 1024), "MEMVAULT_TRANSFER_GRACE": str(grace)}
    server = LiveServer(tmp_path / "data", env=env)
    server.start()
    return server


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[LiveServer]:
    """Stalled bodies are tolerated for a minute, so slot tests do not race the rate check."""
    server = start_limited(tmp_path, grace=60)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def impatient(tmp_path: Path) -> Iterator[LiveServer]:
    """A body behind the minimum rate is cut off after one second."""
    server = start_limited(tmp_path, grace=1)
    try:
        yield server
    finally:
        server.kill()


def test_transfer_slots_refuse_with_429_and_come_back_on_every_path(
    limited: LiveServer, connect: Connect, raw_put: RawPuts,
) -> None:
    alice_token = limited.token
    bob_token = mint_token(limited, "bob")
    alice, bob = connect(limited, alice_token), connect(limited, bob_token)
    data = os.urandom(4 * CHUNK)
    a = alice.session(alice.capsule(), len(data))
    b = bob.session(bob.capsule(), len(data))

    # Alice holds her two slots with stalled bodies.
    held = [raw_put(limited, alice_token, a["id"], i, CHUNK) for i in (0, 1)]
    for i, put in enumerate(held):
        put.send(data[i * CHUNK:i * CHUNK + 1000])
    wait_for(lambda: metric(limited, "memvault_transfer_slots_in_use") == 2)
    r = alice.put(a, 2, data)
    p = problem(r, 429, "resource_exhausted")
    assert p["limit_name"] == "transfer_slots_per_principal"
    assert (p["active"], p["limit"]) == (2, 2)
    assert r.headers["Retry-After"] == "1"

    # Bob takes the last slot of the process; then Bob is refused by the global limit.
    third = raw_put(limited, bob_token, b["id"], 0, CHUNK)
    third.send(data[:1000])
    wait_for(lambda: metric(limited, "memvault_transfer_slots_in_use") == 3)
    p = problem(bob.put(b, 1, data), 429, "resource_exhausted")
    assert p["limit_name"] == "transfer_slots"
    assert (p["active"], p["limit"]) == (3, 3)

    # Ways out: a disconnect and completion (a body too slow for the minimum rate is the
    # trickle test's business).
    held[0].close()
    held[1].send(data[CHUNK + 1000:2 * CHUNK])
    assert held[1].response()[0] == 200
    third.send(data[1000:CHUNK])
    assert third.response()[0] == 200
    wait_for(lambda: metric(limited, "memvault_transfer_slots_in_use") == 0)

    # Typed errors release their slot too.
    problem(alice.put(a, 0, data, **{"Content-Digest": "crc32c=:AAAAAA==:"}), 422,
            "checksum_mismatch")
    assert metric(limited, "memvault_transfer_slots_in_use") == 0
    assert metric(limited, "memvault_admission_rejections_total",
                  limit="transfer_slots_per_principal") == 1
    assert metric(limited, "memvault_admission_rejections_total", limit="transfer_slots") == 1

    # The refused and broken chunks were not received; sent again they complete the upload.
    for api_, s in ((alice, a), (bob, b)):
        status_ = api_.http.get(f"/v1/uploads/{s['id']}").json()
        for index in range(4):
            if index not in status_["received"]:
                assert api_.put(s, index, data).status_code == 200
        assert api_.finish(s, data).status_code == 200
    assert metric(limited, "memvault_transfer_slots_in_use") == 0


def test_a_trickling_body_is_cut_off_and_the_chunk_can_be_sent_again(
    impatient: LiveServer, connect: Connect, raw_put: RawPuts,
) -> None:
    api = connect(impatient)
    data = os.urandom(CHUNK)
    s = api.session(api.capsule(), len(data))
    put = raw_put(impatient, impatient.token, s["id"], 0, CHUNK)
    started = time.monotonic()
    status = 0
    for i in range(200):  # 1 KiB every 50 ms is 20 KiB/s, under the 64 KiB/s minimum
        try:
            put.send(data[i * 1024:(i + 1) * 1024])
        except OSError:
            break
        time.sleep(0.05)
        if time.monotonic() - started > 3:
            break
    status, body = put.response()
    put.close()
    assert status == 408, body
    assert b'"code":"timeout"' in body
    assert b"slower than 65536 bytes/s" in body
    wait_for(lambda: metric(impatient, "memvault_transfer_slots_in_use") == 0)
    assert api.http.get(f"/v1/uploads/{s['id']}").json()["received"] == []
    assert api.put(s, 0, data).status_code == 200
    assert api.finish(s, data).json()["asset"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_json_bodies_over_the_limit_are_refused(limited: LiveServer, connect: Connect) -> None:
    api = connect(limited)
    p = problem(api.http.post("/v1/capsules", json={"name": "x" * 70_000}), 413,
                "payload_too_large")
    assert p["limit"] == 64 * 1024
    assert p["limit_name"] == "max_json_bytes"

    def chunked() -> Iterator[bytes]:  # no Content-Length: cut off while it is read
        yield b'{"name": "'
        for _ in range(100):
            yield b"y" * 1000
        yield b'"}'

    r = api.http.post("/v1/capsules", content=chunked(),
                      headers={"Content-Type": "application/json"})
    problem(r, 413, "payload_too_large")
    assert api.http.post("/v1/capsules", json={"name": "small"}).status_code == 201


def _quota_server(tmp_path: Path, **env: str) -> LiveServer:
    server = LiveServer(tmp_path / "data", env={**SMALL_CHUNKS, **env})
    server.start()
    return server


def test_daily_upload_quota_reserves_at_begin_and_abort_gives_it_back(
    tmp_path: Path, connect: Connect,
) -> None:
    server = _quota_server(tmp_path, MEMVAULT_DAILY_UPLOAD_QUOTA=str(1024 * 1024))
    try:
        api = connect(server)
        capsule = api.capsule()
        first = api.session(capsule, 600 * 1024)
        r = api.begin(capsule, 600 * 1024)
        p = problem(r, 429, "resource_exhausted")
        assert p["limit_name"] == "daily_upload_quota"
        assert (p["used"], p["limit"], p["requested"]) == (600 * 1024, 1024 * 1024, 600 * 1024)
        assert p["resets_at"].endswith("T00:00:00Z")
        assert int(r.headers["Retry-After"]) > 0
        assert api.http.delete(f"/v1/uploads/{first['id']}").status_code == 204
        data = os.urandom(600 * 1024)
        s = api.session(capsule, len(data))
        for i in range(-(-len(data) // CHUNK)):
            assert api.put(s, i, data).status_code == 200
        assert api.finish(s, data).status_code == 200
        # Finished uploads count for the rest of the day.
        assert problem(api.begin(capsule, 600 * 1024), 429, "resource_exhausted")["used"] == (
            600 * 1024)
        assert metric(server, "memvault_uploaded_bytes_today") == 600 * 1024
        assert metric(server, "memvault_reserved_bytes") == 0
    finally:
        server.kill()


def test_storage_quota_counts_stored_and_reserved_bytes(tmp_path: Path, connect: Connect) -> None:
    server = _quota_server(tmp_path, MEMVAULT_STORAGE_QUOTA=str(1024 * 1024))
    try:
        api = connect(server)
        capsule = api.capsule()
        data = os.urandom(400 * 1024)
        done = api.session(capsule, len(data))
        for i in range(2):
            api.put(done, i, data)
        assert api.finish(done, data).status_code == 200
        pending = api.session(capsule, 400 * 1024)
        p = problem(api.begin(capsule, 400 * 1024), 507, "insufficient_storage")
        assert p["limit_name"] == "storage_quota"
        assert (p["used"], p["reserved"], p["limit"]) == (400 * 1024, 400 * 1024, 1024 * 1024)
        assert metric(server, "memvault_stored_bytes") == 400 * 1024
        assert metric(server, "memvault_reserved_bytes") == 400 * 1024
        api.http.delete(f"/v1/uploads/{pending['id']}")
        assert api.begin(capsule, 400 * 1024).status_code == 201
    finally:
        server.kill()


def test_a_full_volume_answers_507_and_loses_nothing_received(
    tmp_path: Path, connect: Connect,
) -> None:
    """The server may write no file past 3 MiB (RLIMIT_FSIZE: the write fails like a full
    disk); chunks past that point get 507, the rest stay received, and after the limit is
    lifted the upload resumes and finishes with the right digest."""
    limit = 3 * 1024 * 1024

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    data = os.urandom(4 * 1024 * 1024)
    server = LiveServer(tmp_path / "data", env=SMALL_CHUNKS, preexec=small_files)
    server.start()
    try:
        api = connect(server)
        s = api.session(api.capsule(), len(data))
        codes = [api.put(s, i, data) for i in range(16)]
        assert [r.status_code for r in codes[:12]] == [200] * 12
        for r in codes[12:]:
            p = problem(r, 507, "insufficient_storage")
            assert p["limit_name"] == "storage_space"
            assert "Retry-After" in r.headers
        assert api.http.get(f"/v1/uploads/{s['id']}").json()["received"] == list(range(12))
    finally:
        server.kill()
    server.preexec = None
    server.start()
    try:
        api = connect(server)
        assert api.http.get(f"/v1/uploads/{s['id']}").json()["received"] == list(range(12))
        for i in range(12, 16):
            assert api.put(s, i, data).status_code == 200
        r = api.finish(s, data)
        assert r.json()["asset"]["sha256"] == hashlib.sha256(data).hexdigest()
    finally:
        server.kill()


def test_admin_endpoints_readiness_and_metrics(limited: LiveServer, connect: Connect) -> None:
    admin = connect(limited)
    bob_token = mint_token(limited, "bob")
    bob = connect(limited, bob_token)
    bob_capsule = bob.capsule()
    bob_session = bob.session(bob_capsule, 10)
    admin_session = admin.session(admin.capsule(), 10)

    config = admin.http.get("/v1/admin/config").json()
    assert config["transfer_slots"] == 3
    assert config["transfer_slots_per_principal"] == 2
    assert config["max_pending_per_capsule"] == 32
    problem(bob.http.get("/v1/admin/config"), 403, "forbidden")
    problem(bob.http.get("/v1/admin/sessions"), 403, "forbidden")

    listed = admin.http.get("/v1/admin/sessions").json()["items"]
    assert {s["id"] for s in listed} == {bob_session["id"], admin_session["id"]}
    assert [s["id"] for s in bob.http.get("/v1/uploads").json()["items"]] == [bob_session["id"]]

    ready = httpx.get(f"{limited.url}/readyz").json()
    assert ready == {"status": "ready", "checks": {"metadata": "ok", "blobs": "ok"}}
    assert metric(limited, "memvault_sessions", state="pending") == 2
    assert metric(limited, "memvault_errors_total", code="forbidden") == 2
    assert metric(limited, "memvault_transfer_slots_limit") == 3
    for name in ("memvault_chunk_seconds_count", "memvault_finish_seconds_count",
                 "memvault_bytes_received_total", "memvault_reaper_runs_total"):
        assert f"\n{name}" in httpx.get(f"{limited.url}/metrics").text

    # Transitions and refusals are logged with the session, the caller and the capsule.
    assert limited.log_path is not None
    events = [json.loads(line) for line in limited.log_path.read_text().splitlines()
              if line.startswith("{")]
    begun = [e for e in events if e["event"] == "session.begin"
             and e["session_id"] == bob_session["id"]]
    assert [(e["caller"], e["owner"], e["scope"]) for e in begun] == [
        (bob_session["owner"], bob_session["owner"], bob_capsule)]
    refused = [e for e in events if e["event"] == "request.rejected" and e["code"] == "forbidden"]
    assert {e["caller"] for e in refused} == {bob_session["owner"]}


def test_headers_that_trickle_in_lose_their_connection(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "data", env={**SMALL_CHUNKS, "MEMVAULT_HEADER_TIMEOUT": "1"})
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            closed = False
            for _ in range(40):  # one header byte every 0.1 s, never the blank line
                try:
                    sock.sendall(b"X")
                except OSError:
                    closed = True
                    break
                time.sleep(0.1)
                try:
                    if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                        closed = True
                        break
                except BlockingIOError:
                    continue  # still open, nothing to read
            assert closed, "the server kept a connection whose headers never completed"
            assert time.monotonic() - started < 3
        # A normal request on a new connection is served.
        assert httpx.get(f"{server.url}/healthz").status_code == 200
    finally:
        server.kill()


def test_a_head_longer_than_the_server_takes_gets_431_and_the_connection_closes(
        server: LiveServer) -> None:
    # httptools would gather a header of any length until the header timeout; the
    # protocol refuses a head past MAX_HEAD_BYTES (plus the read it began in).
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/capsules HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Authorization: Bearer ")
        sent = 0
        try:
            while sent < 4 * MAX_HEAD_BYTES:  # a token that never ends
                sock.sendall(b"x" * 16384)
                sent += 16384
                time.sleep(0.002)  # separate reads, as a slow sender's would be
        except OSError:
            pass  # closed on us mid-send: the answer is already there to read
        answer = read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"connection: close" in head.lower()
    problem = json.loads(body)
    assert problem["code"] == "headers_too_large"
    assert problem["limit"] == MAX_HEAD_BYTES
    # A head of an ordinary size (a 16 KiB header) is read and answered as usual.
    r = httpx.get(f"{server.url}/v1/capsules",
                  headers={"Authorization": f"Bearer {server.token}", "X-Big": "y" * 16384})
    assert r.status_code == 200

