"""Crashes, disconnects, memory and storage: what survives and what it costs."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openapi_spec_validator import validate

from tests.conftest import LiveServer
from tests.helpers import Api, metric

MiB = 1024 * 1024


def _slow_body(data: bytes, stop_after: int, started: threading.Event) -> Iterator[bytes]:
    """Yield ``stop_after`` bytes, then stall (the server gets killed meanwhile)."""
    yield data[:stop_after]
    started.set()
    time.sleep(30)
    yield data[stop_after:]


def test_sigkill_mid_upload_then_resume_from_status(tmp_path: Path) -> None:
    fresh_server = LiveServer(tmp_path / "data")  # the default claim lease, 10 s
    fresh_server.start()
    api = fresh_server.api()
    cap = api.capsule()
    data = os.urandom(4 * 8 * MiB + 12345)
    s = api.session(cap, len(data))
    assert s["chunk_count"] == 5
    for i in (0, 1, 3):
        assert api.put(s, i, data).status_code == 200

    # Chunk 2 is half-way through the socket when the server dies.
    started = threading.Event()
    cs = s["chunk_size"]
    chunk2 = data[2 * cs:3 * cs]

    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):  # expected: the server dies under it
            api.http.put(f"/v1/uploads/{s['id']}/chunks/2",
                         content=_slow_body(chunk2, cs // 2, started),
                         headers={"Content-Length": str(cs)})

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    assert started.wait(30)
    time.sleep(0.3)
    fresh_server.kill()  # SIGKILL
    api.http.close()

    fresh_server.start()
    api = fresh_server.api()
    status = api.http.get(f"/v1/uploads/{s['id']}").json()
    assert status["state"] == "pending"
    assert status["received"] == [0, 1, 3]
    assert status["bytes_received"] == 3 * cs
    # The dead process's claim on chunk 2 is taken over at once: the lock its process held
    # on a file in writers/ went with it. (Until the claim lease lapsed, a retry had been
    # told 503.)
    r = api.put(s, 2, data)
    assert r.status_code == 200, r.text
    assert r.json()["duplicate"] is False
    assert api.put(s, 4, data).status_code == 200
    done = api.finish(s, data)
    assert done.status_code == 200, done.text
    assert api.read(done.json()["memory_id"]).content == data
    api.http.close()
    fresh_server.kill()


def test_client_disconnect_mid_chunk_leaves_it_unreceived(api: Api, server: LiveServer) -> None:
    cap = api.capsule()
    data = os.urandom(3 * 256 * 1024)
    s = api.session(cap, len(data))
    cs = s["chunk_size"]
    head = (
        f"PUT /v1/uploads/{s['id']}/chunks/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {server.token}\r\nContent-Length: {cs}\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + data[cs:cs + cs // 3])
        time.sleep(0.3)
    # The server notices the disconnect and drops the chunk's claim, then its transfer slot
    # (in that order, so a free slot means the claim is gone). Until then a retry would find
    # the range still claimed and be told to wait (503): so wait for the slot, not longer.
    deadline = time.monotonic() + 10
    while metric(server, "memvault_transfer_slots_in_use") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert api.http.get(f"/v1/uploads/{s['id']}").json()["received"] == []
    r = api.put(s, 1, data)
    assert r.status_code == 200, r.text
    assert r.json()["duplicate"] is False
    for i in (0, 2):
        assert api.put(s, i, data).status_code == 200
    done = api.finish(s, data)
    assert done.status_code == 200, done.text
    assert api.read(done.json()["memory_id"]).content == data


@pytest.fixture
def big_chunk_server(tmp_path: Path) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path / "data", env={"MEMVAULT_CHUNK_SIZE": str(32 * MiB)})
    server.start()
    yield server
    server.kill()


def test_64_mib_upload_does_not_grow_server_memory(big_chunk_server: LiveServer) -> None:
    """With 32 MiB chunks, buffering even one chunk would add 32 MiB to the peak."""
    api = big_chunk_server.api()
    cap = api.capsule()
    api.upload(cap, os.urandom(2 * MiB))  # warm every code path first
    baseline = big_chunk_server.rss_kib("VmHWM")
    data = os.urandom(64 * MiB)
    s = api.session(cap, len(data))
    assert s["chunk_size"] == 32 * MiB
    threads = [threading.Thread(target=api.put, args=(s, i, data)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert api.finish(s, data).status_code == 200
    grown_mib = (big_chunk_server.rss_kib("VmHWM") - baseline) / 1024
    assert grown_mib < 12, f"server peak RSS grew by {grown_mib:.1f} MiB for a 64 MiB upload"
    api.http.close()


def test_identical_content_is_stored_once(api: Api, server: LiveServer) -> None:
    cap = api.capsule()
    data = os.urandom(700 * 1024)
    first = api.upload(cap, data)
    second = api.upload(cap, data)
    assert first["memory_id"] != second["memory_id"]
    sha = hashlib.sha256(data).hexdigest()
    copies = list((server.data_dir / "blobs").rglob(sha))
    assert len(copies) == 1
    db = sqlite3.connect(server.data_dir / "memvault.db")
    try:
        (refcount,) = db.execute("SELECT refcount FROM blobs WHERE sha256 = ?", (sha,)).fetchone()
    finally:
        db.close()
    assert refcount == 2
    assert api.read(second["memory_id"]).content == data


@pytest.mark.parametrize("damage", ["overwritten", "truncated"])
def test_the_same_content_again_heals_a_damaged_blob(api: Api, server: LiveServer,
                                                    damage: str) -> None:
    """The bytes a finish has just verified replace a stored copy of the same name: keeping
    a damaged one (the old way) answered 200 and served the damage to both memories."""
    cap = api.capsule()
    data = os.urandom(700 * 1024)
    first = api.upload(cap, data)
    [blob] = (server.data_dir / "blobs").rglob(hashlib.sha256(data).hexdigest())
    if damage == "overwritten":
        with blob.open("r+b") as f:
            f.seek(1000)
            f.write(b"\0\0\0\0")
    else:
        os.truncate(blob, 1024)
    second = api.upload(cap, data)
    for done in (first, second):
        assert api.read(done["memory_id"]).content == data


def test_tokens_are_minted_by_cli_and_stored_hashed(server: LiveServer) -> None:
    token_file = server.data_dir / "admin.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    out = subprocess.run(
        [sys.executable, "-m", "memvault", "token", "create", "bob-cli", "--data",
         str(server.data_dir)],
        capture_output=True, text=True, check=True,
    )
    token = out.stdout.strip()
    assert token.startswith("mvt_")
    bob = server.api(token)
    assert bob.http.get("/v1/capsules").json() == []
    raw = b"".join(p.read_bytes() for p in server.data_dir.glob("memvault.db*"))
    assert token.encode() not in raw
    assert server.token.encode() not in raw
    again = subprocess.run(
        [sys.executable, "-m", "memvault", "token", "create", "bob-cli", "--data",
         str(server.data_dir)],
        capture_output=True, text=True,
    )
    assert again.returncode == 1
    assert "already exists" in again.stderr
    bob.http.close()


def test_a_rotated_token_stops_working_at_once(server: LiveServer) -> None:
    def memvault(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "memvault", "token", *args, "--data",
                               str(server.data_dir)], capture_output=True, text=True)

    old = memvault("create", "carol-cli").stdout.strip()
    carol = server.api(old)
    cap = carol.http.post("/v1/capsules", json={"name": "carol-things"}).json()["id"]
    rotated = memvault("rotate", "carol-cli")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert new.startswith("mvt_")
    assert new != old
    r = carol.http.get("/v1/capsules")  # the running server, no restart
    assert r.status_code == 401
    assert r.json()["code"] == "unauthenticated"
    fresh = server.api(new)
    assert [c["id"] for c in fresh.http.get("/v1/capsules").json()] == [cap]
    missing = memvault("rotate", "nobody-cli")
    assert missing.returncode == 1
    assert "no principal named 'nobody-cli'" in missing.stderr
    carol.http.close()
    fresh.http.close()


def test_openapi_document_lists_the_api(api: Api) -> None:
    doc = api.http.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["paths"]["/v1/capsules"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in doc["paths"]["/healthz"]["get"]
    for path in ("/v1/uploads", "/v1/uploads/{session_id}/chunks/{index}",
                 "/v1/uploads/{session_id}/finish", "/v1/memories/{memory_id}/assets/{role}",
                 "/v1/capsules/{capsule_id}/memories"):
        assert path in doc["paths"], path
    # Errors are documented as the server sends them: problem documents, 400 for a
    # malformed request, never FastAPI's default 422 shape (422 means a checksum here).
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert "Problem" in doc["components"]["schemas"]
    begin = doc["paths"]["/v1/uploads"]["post"]["responses"]
    assert "422" not in begin
    assert "application/problem+json" in begin["400"]["content"]
    for path_item in doc["paths"].values():
        for operation in path_item.values():
            assert "default" in operation["responses"]
    r = api.http.post("/v1/uploads", json={"capsule_id": 5})
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_argument"


def test_openapi_document_is_valid_and_says_what_the_routes_take(api: Api) -> None:
    """A generated client needs a valid document: GET and HEAD of an asset had one
    operation id between them, which OpenAPI forbids."""
    doc = api.http.get("/openapi.json").json()
    validate(doc)  # raises, naming the first error
    asset = doc["paths"]["/v1/memories/{memory_id}/assets/{role}"]
    assert asset["get"]["operationId"] != asset["head"]["operationId"]
    headers = {p["name"] for p in asset["get"]["parameters"] if p["in"] == "header"}
    assert {"Range", "If-Range", "If-Match", "If-None-Match"} <= headers
    assert "ETag" in asset["get"]["responses"]["200"]["headers"]
    chunk = doc["paths"]["/v1/uploads/{session_id}/chunks/{index}"]["put"]
    params = {p["name"]: p for p in chunk["parameters"]}
    assert params["index"]["schema"]["pattern"] == "^(0|[1-9][0-9]{0,9})$"
    assert {"Content-Length", "Content-Digest"} <= set(params)
    begin = doc["paths"]["/v1/uploads"]["post"]["responses"]
    assert begin["200"]["content"]["application/json"]["schema"] == (
        begin["201"]["content"]["application/json"]["schema"])
