"""Every error the v1 API answers, as a user sees it, and that nothing it had accepted is lost.

Each test makes its own capsule. Most run against the module's shared server (256 KiB chunks);
the ones that need other settings (TTL, limits, disk reserve, chunk timeout) start a small
server of their own for this module.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import crc32c
import httpx
import pytest

from tests.conftest import SMALL_CHUNKS, LiveServer
from tests.helpers import Api, problem, read_all, settled

CHUNK = 256 * 1024
MiB = 1024 * 1024
TiB = 1024**4


# -- helpers ---------------------------------------------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def piece(session: dict[str, Any], data: bytes, index: int) -> bytes:
    cs = session["chunk_size"]
    return data[index * cs:(index + 1) * cs]


def put_raw(api: Api, session_id: str, index: int | str, body: bytes,
            headers: dict[str, str] | None = None) -> httpx.Response:
    return api.http.put(f"/v1/uploads/{session_id}/chunks/{index}", content=body,
                        headers=headers or {})


def digest_header(body: bytes, *, sha256: bool = True, crc: bool = False) -> str:
    parts = []
    if sha256:
        parts.append(f"sha-256=:{base64.b64encode(hashlib.sha256(body).digest()).decode()}:")
    if crc:
        raw = crc32c.crc32c(body).to_bytes(4, "big")
        parts.append(f"crc32c=:{base64.b64encode(raw).decode()}:")
    return ", ".join(parts)


def status_of(api: Api, session_id: str) -> dict[str, Any]:
    r = api.http.get(f"/v1/uploads/{session_id}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def complete(api: Api, session: dict[str, Any], data: bytes) -> dict[str, Any]:
    """Send every chunk the server does not have yet, finish, and check the bytes read back."""
    have = set(status_of(api, session["id"])["received"])
    for i in range(session["chunk_count"]):
        if i not in have:
            r = api.put(session, i, data)
            assert r.status_code == 200, r.text
    r = api.finish(session, data)
    assert r.status_code == 200, r.text
    done: dict[str, Any] = r.json()
    assert done["asset"]["sha256"] == sha(data)
    assert done["asset"]["size"] == len(data)
    got = api.read(done["memory_id"], done["role"])
    assert got.status_code == 200
    assert got.content == data
    return done


def mint_token(server: LiveServer, name: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "memvault", "token", "create", name, "--data",
         str(server.data_dir)],
        capture_output=True, text=True, check=True, timeout=60,
    )
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert lines, out.stderr
    return lines[-1].strip()


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@contextlib.contextmanager
def dedicated(tmp_path_factory: pytest.TempPathFactory, name: str,
              **env: str) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path_factory.mktemp(name) / "data", env={**SMALL_CHUNKS, **env})
    try:
        srv.start()
        yield srv
    finally:
        srv.kill(signal.SIGTERM)


@contextlib.contextmanager
def client(srv: LiveServer, token: str | None = None) -> Iterator[Api]:
    api = srv.api(token)
    try:
        yield api
    finally:
        api.http.close()


@contextlib.contextmanager
def raw_client(srv: LiveServer, headers: dict[str, str] | None = None) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, timeout=60, headers=headers or {}) as http:
        yield http


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_token(server: LiveServer) -> str:
    return mint_token(server, f"other-{secrets.token_hex(4)}")


@pytest.fixture
def other(server: LiveServer, other_token: str) -> Iterator[Api]:
    with client(server, other_token) as api:
        yield api


@pytest.fixture(scope="module")
def limits_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with dedicated(
        tmp_path_factory, "limits",
        MEMVAULT_MAX_UPLOAD_SIZE=str(2 * 1024 * 1024),
        MEMVAULT_MAX_CHUNK_SIZE=str(512 * 1024),
        MEMVAULT_MAX_CHUNK_COUNT="2",
        MEMVAULT_MAX_PENDING_PER_CAPSULE="3",
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def expiry_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with dedicated(
        tmp_path_factory, "expiry",
        MEMVAULT_SESSION_TTL="1",
        MEMVAULT_REAPER_INTERVAL="0.5",
        MEMVAULT_EXPIRED_GRACE="2",
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def full_disk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    base = tmp_path_factory.mktemp("fulldisk")
    reserve = shutil.disk_usage(base).free + TiB
    srv = LiveServer(base / "data", env={**SMALL_CHUNKS, "MEMVAULT_STORAGE_RESERVE": str(reserve)})
    try:
        srv.start()
        yield srv
    finally:
        srv.kill(signal.SIGTERM)


@pytest.fixture
def tight_disk_server(tmp_path: Path) -> Iterator[LiveServer]:
    """Leaves about 2 GiB of the disk's free space to uploads.

    Measured when the test starts, not per module: other tests (and other programs on the
    machine) write to this disk too, and the test only tolerates the free space drifting by a
    few hundred MiB between here and its requests.
    """
    reserve = max(0, shutil.disk_usage(tmp_path).free - 2048 * MiB)
    srv = LiveServer(tmp_path / "data",
                     env={**SMALL_CHUNKS, "MEMVAULT_STORAGE_RESERVE": str(reserve)})
    try:
        srv.start()
        yield srv
    finally:
        srv.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with dedicated(tmp_path_factory, "slow", MEMVAULT_CHUNK_TIMEOUT="2") as srv:
        yield srv


# -- 401 unauthenticated ---------------------------------------------------------------------


def _guarded_requests(api: Api) -> tuple[list[tuple[str, str, dict[str, Any]]], str]:
    """One request per kind of endpoint, aimed at things that really exist."""
    cap = api.capsule()
    data = os.urandom(CHUNK + 10)
    done = api.upload(cap, data)
    s = api.session(cap, len(data))
    mem = done["memory_id"]
    return [
        ("GET", "/v1/capsules", {}),
        ("POST", "/v1/capsules", {"json": {"name": "x"}}),
        ("GET", f"/v1/capsules/{cap}/memories", {}),
        ("POST", f"/v1/capsules/{cap}/memories", {"json": {}}),
        ("GET", f"/v1/memories/{mem}", {}),
        ("GET", f"/v1/memories/{mem}/assets/original", {}),
        ("POST", "/v1/uploads", {"json": {"capsule_id": cap, "filename": "f", "size": 1,
                                          "idempotency_key": "k"}}),
        ("GET", "/v1/uploads", {}),
        ("GET", f"/v1/uploads/{s['id']}", {}),
        ("PUT", f"/v1/uploads/{s['id']}/chunks/0", {"content": data[:CHUNK]}),
        ("POST", f"/v1/uploads/{s['id']}/finish", {"json": {"size": len(data),
                                                             "sha256": sha(data)}}),
        ("DELETE", f"/v1/uploads/{s['id']}", {}),
    ], s["id"]


def test_401_without_authorization_header(api: Api, server: LiveServer) -> None:
    requests, session_id = _guarded_requests(api)
    with raw_client(server) as anonymous:
        for method, path, kwargs in requests:
            r = anonymous.request(method, path, **kwargs)
            body = problem(r, 401, "unauthenticated")
            assert "Authorization: Bearer" in body["detail"], (method, path, body)
    # Nothing was done on the caller's behalf: the admin's pending session is untouched.
    pending = [s for s in api.http.get("/v1/uploads").json()["items"] if s["id"] == session_id]
    assert len(pending) == 1
    assert pending[0]["received"] == []


def test_401_wrong_token(api: Api, server: LiveServer) -> None:
    requests, _ = _guarded_requests(api)
    for token in ["mvt_" + secrets.token_urlsafe(32), server.token + "x", "x"]:
        with raw_client(server, {"Authorization": f"Bearer {token}"}) as wrong:
            for method, path, kwargs in requests:
                r = wrong.request(method, path, **kwargs)
                body = problem(r, 401, "unauthenticated")
                assert "not valid" in body["detail"], (method, path, body)
            # An id that does not exist answers the same: a bad token cannot probe ids.
            r = wrong.get("/v1/memories/mem_doesnotexist")
            problem(r, 401, "unauthenticated")


@pytest.mark.parametrize(
    "template",
    ["Basic dXNlcjpwYXNzd29yZA==", "Token {token}", "{token}", "Bearer", "Bearer\t{token}x",
     "Digest username=admin"],
)
def test_401_malformed_scheme(server: LiveServer, template: str) -> None:
    header = template.format(token=server.token)
    with raw_client(server, {"Authorization": header}) as http:
        for method, path in [("GET", "/v1/capsules"), ("GET", "/v1/uploads")]:
            body = problem(http.request(method, path), 401, "unauthenticated")
            assert "Bearer" in body["detail"]


def test_bearer_scheme_is_case_insensitive(server: LiveServer) -> None:
    with raw_client(server, {"Authorization": f"bearer {server.token}"}) as http:
        assert http.get("/v1/capsules").status_code == 200


def test_401_carries_a_bearer_challenge(server: LiveServer) -> None:
    """RFC 9110 §11.6.1: a 401 MUST carry WWW-Authenticate with at least one challenge."""
    with raw_client(server) as anonymous:
        r = anonymous.get("/v1/capsules")
    problem(r, 401, "unauthenticated")
    assert r.headers.get("www-authenticate", "").lower().startswith("bearer"), r.headers


# -- 404 not_found ---------------------------------------------------------------------------


def test_another_principal_gets_404_never_403(api: Api, other: Api) -> None:
    cap = api.capsule()
    data = os.urandom(2 * CHUNK + 99)
    done = api.upload(cap, data)
    mem = done["memory_id"]
    pending_data = os.urandom(2 * CHUNK + 5)
    s = api.session(cap, len(pending_data))
    assert api.put(s, 0, pending_data).status_code == 200
    own_cap = other.capsule()

    attempts: list[tuple[str, httpx.Response]] = [
        ("list memories", other.http.get(f"/v1/capsules/{cap}/memories")),
        ("create memory", other.http.post(f"/v1/capsules/{cap}/memories", json={})),
        ("see memory", other.http.get(f"/v1/memories/{mem}")),
        ("read asset", other.read(mem)),
        ("read range", other.read(mem, Range="bytes=0-9")),
        ("upload into capsule", other.begin(cap, 10)),
        ("upload into memory", other.begin(own_cap, 10, memory_id=mem, role="thumb")),
        ("see session", other.http.get(f"/v1/uploads/{s['id']}")),
        ("put chunk", other.put(s, 1, pending_data)),
        ("re-put received chunk", other.put(s, 0, pending_data)),
        ("finish", other.finish(s, pending_data)),
        ("abort", other.http.delete(f"/v1/uploads/{s['id']}")),
    ]
    for what, r in attempts:
        assert r.status_code != 403, what
        body = problem(r, 404, "not_found")
        assert "not found" in body["detail"] or "no " in body["detail"], (what, body)

    # Lists do not reveal it either.
    assert cap not in {c["id"] for c in other.http.get("/v1/capsules").json()}
    assert s["id"] not in {x["id"] for x in other.http.get("/v1/uploads").json()["items"]}

    # The owner's things are untouched: the session resumes, the asset reads back.
    assert status_of(api, s["id"])["received"] == [0]
    complete(api, s, pending_data)
    assert api.read(mem).content == data
    assert list(api.http.get(f"/v1/memories/{mem}").json()["assets"]) == ["original"]


def test_unknown_ids_are_404(api: Api) -> None:
    cap = api.capsule()
    done = api.upload(cap, os.urandom(100))
    mem = done["memory_id"]
    attempts: list[tuple[str, httpx.Response]] = [
        ("memory", api.http.get("/v1/memories/mem_nope")),
        ("asset of unknown memory", api.read("mem_nope")),
        ("list memories of unknown capsule", api.http.get("/v1/capsules/cap_nope/memories")),
        ("create memory in unknown capsule",
         api.http.post("/v1/capsules/cap_nope/memories", json={})),
        ("begin in unknown capsule", api.begin("cap_nope", 10)),
        ("begin for unknown memory", api.begin(cap, 10, memory_id="mem_nope")),
        ("session", api.http.get("/v1/uploads/ses_nope")),
        ("put chunk", put_raw(api, "ses_nope", 0, b"x" * 10)),
        ("finish", api.http.post("/v1/uploads/ses_nope/finish",
                                 json={"size": 10, "sha256": "0" * 64})),
        ("abort", api.http.delete("/v1/uploads/ses_nope")),
        ("role with no asset", api.read(mem, "thumb")),
        ("unknown role", api.read(mem, "poster")),
    ]
    for what, r in attempts:
        body = problem(r, 404, "not_found")
        assert body["detail"], what
    assert "thumb" in api.read(mem, "thumb").json()["detail"]


def test_begin_with_a_memory_of_another_capsule_is_404(api: Api) -> None:
    cap_a, cap_b = api.capsule(), api.capsule()
    mem = api.upload(cap_a, b"hello")["memory_id"]
    body = problem(api.begin(cap_b, 5, memory_id=mem, role="thumb"), 404, "not_found")
    assert mem in body["detail"]


def test_unknown_route_is_404_problem(server: LiveServer) -> None:
    with raw_client(server, {"Authorization": f"Bearer {server.token}"}) as http:
        for path in ["/v1/nope", "/nope", "/v1/uploads/ses_x/chunks", "/v2/capsules"]:
            problem(http.get(path), 404, "not_found")
    with raw_client(server) as anonymous:
        problem(anonymous.get("/v1/nope"), 404, "not_found")


def test_head_answers_every_get_route_without_a_body(server: LiveServer, api: Api) -> None:
    """RFC 9110 §9.3.2; a load balancer checking ``HEAD /healthz`` saw a 405."""
    mem = api.upload(api.capsule(), b"hello")["memory_id"]
    # Its derivative job settles in the background, changing the memory's document (a GET
    # and a HEAD either side of that differed in length).
    settled(api, mem)
    for path in ["/healthz", "/v1/capsules", f"/v1/memories/{mem}", "/v1/uploads"]:
        got, head = api.http.get(path), api.http.head(path)
        assert head.status_code == got.status_code == 200, (path, head.status_code)
        assert head.content == b""
        assert head.headers["content-length"] == got.headers["content-length"], path
        assert head.headers["content-type"] == got.headers["content-type"], path
    with raw_client(server) as anonymous:
        assert anonymous.head("/v1/capsules").status_code == 401
        assert anonymous.head("/healthz").status_code == 200


def test_a_trailing_slash_is_404_not_a_redirect(api: Api) -> None:
    """No 307 to the path without the slash: it answered before authentication, with an
    http:// Location, and a client taking it for success "aborted" ``DELETE /v1/uploads/``."""
    s = api.session(api.capsule(), 10)
    for method, path in [("GET", "/v1/capsules/"), ("POST", "/v1/capsules/"),
                         ("DELETE", "/v1/uploads/"), ("GET", f"/v1/uploads/{s['id']}/"),
                         ("GET", "/healthz/")]:
        r = api.http.request(method, path)
        assert "location" not in r.headers, (method, path, r.headers)
        problem(r, 404, "not_found")
    assert status_of(api, s["id"])["state"] == "pending"


def test_wrong_method_is_405_problem_with_allow(server: LiveServer) -> None:
    """RFC 9457: the body's ``status`` matches the response; RFC 9110: 405 MUST carry Allow."""
    with raw_client(server, {"Authorization": f"Bearer {server.token}"}) as http:
        r = http.patch("/v1/capsules", json={})
    assert r.status_code == 405, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["status"] == 405, r.json()
    assert "GET" in r.headers.get("allow", ""), r.headers


# -- 400 invalid_argument --------------------------------------------------------------------


def test_400_bad_json_body(api: Api) -> None:
    cap = api.capsule()
    s = api.session(cap, 10)
    hdr = {"Content-Type": "application/json"}
    for path in ["/v1/uploads", "/v1/capsules", f"/v1/uploads/{s['id']}/finish"]:
        for raw in [b'{"capsule_id": ', b"not json", b"[1, 2"]:
            r = api.http.post(path, content=raw, headers=hdr)
            body = problem(r, 400, "invalid_argument")
            assert "JSON" in body["detail"] or "json" in body["detail"], body
            assert body["errors"], body
    # The session is still there, pending and usable.
    data = os.urandom(10)
    complete(api, s, data)


def test_400_bytes_past_a_chunk_body_are_a_request_of_their_own(
        api: Api, server: LiveServer) -> None:
    """A client that sends more than its Content-Length: by HTTP/1.1 the rest is the next
    request on the connection. The chunk counts (it was exactly what was declared); the
    rest, no request at all, gets a problem document (not uvicorn's text/plain) and the
    connection closes, since nothing after it can be told apart."""
    cap = api.capsule()
    data = os.urandom(CHUNK + 10)
    s = api.session(cap, len(data))
    head = (f"PUT /v1/uploads/{s['id']}/chunks/0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {server.token}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {CHUNK}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head.encode() + piece(s, data, 0) + b"\x00 these ten extra bytes\r\n\r\n")
        answer = read_all(sock)  # until the server closes the connection
    first, _, rest = answer.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 "), answer[:300]
    length = int(next(line.split(b":")[1] for line in first.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    assert json.loads(rest[:length])["received_count"] == 1
    second, _, body = rest[length:].partition(b"\r\n\r\n")
    assert second.startswith(b"HTTP/1.1 400 "), second
    assert b"content-type: application/problem+json" in second.lower()
    assert b"connection: close" in second.lower()
    detail = json.loads(body)
    assert detail["code"] == "invalid_argument"
    assert detail["status"] == 400
    assert "Content-Length" in detail["detail"]
    # Nothing accepted was lost: chunk 0 stays received and the upload completes.
    assert status_of(api, s["id"])["received"] == [0]
    complete(api, s, data)
    # Alone on a connection, such bytes get the same answer.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"\x00 no request\r\n\r\n")
        alone = read_all(sock)
    assert alone.startswith(b"HTTP/1.1 400 "), alone
    assert json.loads(alone.partition(b"\r\n\r\n")[2])["code"] == "invalid_argument"


def test_400_json_sent_as_another_media_type_says_so(api: Api) -> None:
    """A JSON body labelled form data (curl's ``-d``) or text: the problem names the
    Content-Type to send, not only that the body is not an object."""
    for sent_as in ["application/x-www-form-urlencoded", "text/plain"]:
        r = api.http.post("/v1/capsules", content=b'{"name": "labelled"}',
                          headers={"Content-Type": sent_as})
        body = problem(r, 400, "invalid_argument")
        assert "Content-Type: application/json" in body["detail"], body
        assert sent_as in body["detail"], body
    for sent_as in ["application/json; charset=utf-8", "application/merge-patch+json"]:
        r = api.http.post("/v1/capsules", content=b'{"name": "labelled-%d"}' % len(sent_as),
                          headers={"Content-Type": sent_as})
        assert r.status_code == 201, r.text


def test_400_missing_fields(api: Api) -> None:
    cap = api.capsule()
    body = problem(api.http.post("/v1/uploads", json={}), 400, "invalid_argument")
    missing = {e["loc"][-1] for e in body["errors"] if e["type"] == "missing"}
    assert missing == {"capsule_id", "filename", "size", "idempotency_key"}, body
    for name in missing:
        assert name in body["detail"]

    body = problem(api.http.post("/v1/uploads", json={"capsule_id": cap, "size": 3}),
                   400, "invalid_argument")
    assert {e["loc"][-1] for e in body["errors"]} == {"filename", "idempotency_key"}

    s = api.session(cap, 3)
    body = problem(api.http.post(f"/v1/uploads/{s['id']}/finish", json={}),
                   400, "invalid_argument")
    assert {e["loc"][-1] for e in body["errors"]} == {"size", "sha256"}
    body = problem(api.http.post("/v1/capsules", json={}), 400, "invalid_argument")
    assert body["errors"][0]["loc"] == ["body", "name"]
    complete(api, s, b"abc")


def test_400_negative_size(api: Api) -> None:
    cap = api.capsule()
    body = problem(api.begin(cap, -1), 400, "invalid_argument")
    assert body["errors"][0]["loc"] == ["body", "size"], body
    assert "size" in body["detail"]
    s = api.session(cap, 3)
    r = api.http.post(f"/v1/uploads/{s['id']}/finish", json={"size": -3, "sha256": sha(b"abc")})
    body = problem(r, 400, "invalid_argument")
    assert body["errors"][0]["loc"] == ["body", "size"], body
    # No upload was started by the rejected begin.
    assert [x["id"] for x in api.http.get("/v1/uploads").json()["items"]
            if x["capsule_id"] == cap] == [s["id"]]
    complete(api, s, b"abc")


def test_400_bad_role(api: Api) -> None:
    cap = api.capsule()
    for role in ["poster", "", "ORIGINAL"]:
        body = problem(api.begin(cap, 10, role=role), 400, "invalid_argument")
        assert body["role"] == role
        assert "original" in body["detail"], body
        assert "thumb" in body["detail"], body
    assert api.http.get(f"/v1/capsules/{cap}/memories").json()["items"] == []


def test_400_empty_derivative(api: Api) -> None:
    cap = api.capsule()
    for role in ["display", "thumb", "placeholder"]:
        body = problem(api.begin(cap, 0, role=role), 400, "invalid_argument")
        assert body["role"] == role
        assert body["detail"] == f"a {role} derivative cannot be empty", body
    assert api.http.get(f"/v1/capsules/{cap}/memories").json()["items"] == []
    # An empty original is a file like any other.
    s = api.session(cap, 0)
    complete(api, s, b"")


def test_400_bad_sha256_at_begin(api: Api) -> None:
    cap = api.capsule()
    for bad in ["xyz", "a" * 63, "a" * 65, "g" * 64, " " + "a" * 63, ""]:
        body = problem(api.begin(cap, 10, sha256=bad), 400, "invalid_argument")
        assert "64 hex" in body["detail"], body
    assert all(x["capsule_id"] != cap for x in api.http.get("/v1/uploads").json()["items"])
    # Upper-case hex is fine.
    data = os.urandom(10)
    s = api.session(cap, len(data), sha256=sha(data).upper())
    complete(api, s, data)


def test_400_bad_sha256_at_finish(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(CHUNK + 1)
    s = api.session(cap, len(data))
    for i in range(s["chunk_count"]):
        assert api.put(s, i, data).status_code == 200
    for bad in ["xyz", sha(data)[:-1], sha(data) + "0", "z" * 64, ""]:
        r = api.http.post(f"/v1/uploads/{s['id']}/finish",
                          json={"size": len(data), "sha256": bad})
        body = problem(r, 400, "invalid_argument")
        assert "64 hex" in body["detail"], body
    assert status_of(api, s["id"])["state"] == "pending"
    complete(api, s, data)


def test_400_sha256_with_a_trailing_newline_at_begin(api: Api) -> None:
    """``re.match(r"^...$")`` also accepts a trailing newline; the API must not."""
    cap = api.capsule()
    data = os.urandom(10)
    body = problem(api.begin(cap, len(data), sha256=sha(data) + "\n"), 400, "invalid_argument")
    assert "64 hex" in body["detail"], body
    assert all(x["capsule_id"] != cap for x in api.http.get("/v1/uploads").json()["items"])


def test_400_sha256_with_a_trailing_newline_at_finish(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(10)
    s = api.session(cap, len(data))
    assert api.put(s, 0, data).status_code == 200
    r = api.http.post(f"/v1/uploads/{s['id']}/finish",
                      json={"size": len(data), "sha256": sha(data) + "\n"})
    body = problem(r, 400, "invalid_argument")
    assert "64 hex" in body["detail"], body
    complete(api, s, data)


def test_400_chunk_index_out_of_range(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(2 * CHUNK + 7)
    s = api.session(cap, len(data))
    assert s["chunk_count"] == 3
    assert api.put(s, 0, data).status_code == 200
    for index in [3, 4, 1000, 9_999_999_999]:
        r = put_raw(api, s["id"], index, piece(s, data, 2))
        body = problem(r, 400, "invalid_argument")
        assert body["chunk_count"] == 3
        assert str(index) in body["detail"], body
        assert "0..2" in body["detail"], body
    assert status_of(api, s["id"])["received"] == [0]
    complete(api, s, data)


def test_errors_say_the_real_reason(api: Api) -> None:
    """Wordings a review found misleading: "outside 0..-1" for a zero-byte upload, "starts
    past the end" for a range ending before its start, "different digest" for a size."""
    cap = api.capsule()
    empty = api.session(cap, 0)
    body = problem(put_raw(api, empty["id"], 0, b""), 400, "invalid_argument")
    assert "no chunks" in body["detail"], body
    data = os.urandom(100)
    s = api.session(cap, len(data))
    complete(api, s, data)
    body = problem(api.read(s["memory_id"], Range="bytes=5-1"), 416, "range_not_satisfiable")
    assert "before it starts" in body["detail"], body
    r = api.http.post(f"/v1/uploads/{s['id']}/finish",
                      json={"size": len(data) + 1, "sha256": sha(data)})
    assert "different size" in problem(r, 409, "conflict")["detail"]


def test_400_non_integer_index(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(CHUNK + 3)
    s = api.session(cap, len(data))
    # Only plain decimal: a lax integer parse would take "1_0" for chunk 10, "+1" and "01"
    # for chunk 1, "-0" for chunk 0.
    for index in ["abc", "1.5", "0x1", "one", "-1", "+0", "00", "-0", "1_0", "%200", "0%20",
                  str(10**30)]:
        body = problem(put_raw(api, s["id"], index, piece(s, data, 0)), 400, "invalid_argument")
        assert body["errors"][0]["loc"] == ["path", "index"], (index, body)
        assert "index" in body["detail"]
    assert status_of(api, s["id"])["received"] == []
    complete(api, s, data)


def test_400_chunk_body_shorter_than_the_chunk(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(2 * CHUNK + 1000)
    s = api.session(cap, len(data))
    for index, body_bytes, expected in [
        (0, piece(s, data, 0)[:100], CHUNK),
        (0, piece(s, data, 0)[:-1], CHUNK),
        (1, b"", CHUNK),
        (2, piece(s, data, 2)[:999], 1000),  # the last chunk holds only the remainder
    ]:
        r = put_raw(api, s["id"], index, body_bytes)
        body = problem(r, 400, "invalid_argument")
        assert body["expected"] == expected, body
        assert str(expected) in body["detail"]
        assert str(len(body_bytes)) in body["detail"]
    st = status_of(api, s["id"])
    assert st["received"] == []
    assert st["bytes_received"] == 0
    complete(api, s, data)


def test_400_chunk_without_content_length(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(CHUNK + 1)
    s = api.session(cap, len(data))

    def stream() -> Iterator[bytes]:
        yield piece(s, data, 0)

    r = api.http.put(f"/v1/uploads/{s['id']}/chunks/0", content=stream())
    assert "content-length" not in r.request.headers
    body = problem(r, 400, "invalid_argument")
    assert "Content-Length" in body["detail"]
    assert status_of(api, s["id"])["received"] == []
    complete(api, s, data)


@pytest.mark.parametrize(
    "header",
    [
        "sha-256=:!!!:",  # not base64
        "sha-256=abc",  # a token, not a byte sequence
        "sha-256=:AAAA:",  # 3 bytes, not 32
        "crc32c=:AAAAAAAA:",  # 6 bytes, not 4
        "crc32c=42",  # an integer, not a byte sequence
        "not a dictionary ((",
        'sha-256="quoted"',
    ],
)
def test_400_malformed_content_digest(api: Api, header: str) -> None:
    cap = api.capsule()
    data = os.urandom(CHUNK + 1)
    s = api.session(cap, len(data))
    r = put_raw(api, s["id"], 0, piece(s, data, 0), {"Content-Digest": header})
    body = problem(r, 400, "invalid_argument")
    assert "Content-Digest" in body["detail"], body
    assert status_of(api, s["id"])["received"] == []
    complete(api, s, data)


def test_400_bad_pagination_cursor(api: Api) -> None:
    cap = api.capsule()
    ids = [api.upload(cap, os.urandom(10))["memory_id"] for _ in range(3)]
    url = f"/v1/capsules/{cap}/memories"
    bad_cursors = [
        "!!!",
        "not-a-cursor",
        base64.urlsafe_b64encode(b'{"a": 1}').decode(),
        base64.urlsafe_b64encode(b"[1, 2, 3]").decode(),
        base64.urlsafe_b64encode(b'["x", "y"]').decode(),
        base64.urlsafe_b64encode(b"[null, 1]").decode(),
        base64.urlsafe_b64encode(b"5").decode(),
        base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(),
    ]
    for cursor in bad_cursors:
        body = problem(api.http.get(url, params={"cursor": cursor}), 400, "invalid_argument")
        assert "cursor" in body["detail"], (cursor, body)
    for limit in [0, -1, 501, "x"]:
        body = problem(api.http.get(url, params={"limit": limit}), 400, "invalid_argument")
        assert "limit" in body["detail"], (limit, body)
    # A cursor the server issued works.
    first = api.http.get(url, params={"limit": 2}).json()
    assert first["next_cursor"]
    second = api.http.get(url, params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert second["next_cursor"] is None
    seen = [m["id"] for m in first["items"] + second["items"]]
    assert sorted(seen) == sorted(ids)
    assert len(set(seen)) == 3


# -- 413 payload_too_large -------------------------------------------------------------------


def test_413_chunk_longer_than_the_chunk(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(2 * CHUNK + 1000)
    s = api.session(cap, len(data))
    for index, body_bytes, limit in [
        (0, piece(s, data, 0) + b"x", CHUNK),
        (1, piece(s, data, 1) * 2, CHUNK),
        (2, piece(s, data, 2) + b"x", 1000),  # the short last chunk
    ]:
        body = problem(put_raw(api, s["id"], index, body_bytes), 413, "payload_too_large")
        assert body["limit"] == limit, body
        assert str(limit) in body["detail"], body
        assert str(len(body_bytes)) in body["detail"], body
    st = status_of(api, s["id"])
    assert st["received"] == []
    assert st["bytes_received"] == 0
    complete(api, s, data)


def test_413_declared_size_over_max_upload_size(limits_server: LiveServer) -> None:
    limit = 2 * 1024 * 1024
    with client(limits_server) as api:
        cap = api.capsule()
        for size in [limit + 1, 10 * limit, 2**62]:
            body = problem(api.begin(cap, size), 413, "payload_too_large")
            assert body["limit"] == limit, body
            assert str(size) in body["detail"], body
        assert api.http.get(f"/v1/capsules/{cap}/memories").json()["items"] == []
        # Up to the limit is accepted (and this server grows chunks to keep the count at 2).
        data = os.urandom(1024 * 1024)
        s = api.session(cap, len(data))
        assert s["chunk_count"] == 2
        complete(api, s, data)


def test_413_more_chunks_than_the_server_allows(limits_server: LiveServer) -> None:
    # max_chunk_size 512 KiB x max_chunk_count 2: 1 MiB is the most one upload can hold.
    with client(limits_server) as api:
        cap = api.capsule()
        size = 1024 * 1024 + 1
        body = problem(api.begin(cap, size), 413, "payload_too_large")
        assert body["limit"] == 1024 * 1024, body
        assert str(size) in body["detail"], body
        assert "2 chunks" in body["detail"], body


# -- 409 conflict ----------------------------------------------------------------------------


def test_409_different_bytes_at_a_received_index(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(2 * CHUNK + 10)
    s = api.session(cap, len(data))
    assert api.put(s, 0, data).json()["duplicate"] is False
    assert api.put(s, 2, data).status_code == 200
    for index in [0, 2]:
        forged = bytearray(piece(s, data, index))
        forged[-1] ^= 0x01
        body = problem(put_raw(api, s["id"], index, bytes(forged)), 409, "conflict")
        assert body["offset"] == index * CHUNK, body
        assert "different bytes" in body["detail"]
    again = api.put(s, 0, data)
    assert again.status_code == 200
    assert again.json()["duplicate"] is True
    assert status_of(api, s["id"])["received"] == [0, 2]
    # The stored chunks are untouched: the original data finishes with its digest.
    complete(api, s, data)


def test_409_idempotency_key_reused_for_a_different_upload(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(CHUNK + 1)
    first = api.session(cap, len(data), idempotency_key="k1")
    assert api.put(first, 0, data).status_code == 200
    for extra in [{"size": len(data) + 1}, {"size": len(data), "sha256": "0" * 64}]:
        body = {"capsule_id": cap, "filename": "f.bin", "idempotency_key": "k1", **extra}
        r = api.http.post("/v1/uploads", json=body)
        problem_body = problem(r, 409, "conflict")
        assert problem_body["session_id"] == first["id"]
        assert "idempotency key" in problem_body["detail"]
    # The same request again is a retry: it returns the same session with its progress.
    retry = api.begin(cap, len(data), idempotency_key="k1")
    assert retry.status_code == 200, retry.text
    assert retry.json()["id"] == first["id"]
    assert retry.json()["received"] == [0]
    complete(api, first, data)


def test_409_role_that_already_has_an_asset(api: Api) -> None:
    cap = api.capsule()
    original = os.urandom(100)
    mem = api.upload(cap, original)["memory_id"]
    body = problem(api.begin(cap, 50, memory_id=mem, role="original"), 409, "conflict")
    assert body["role"] == "original"
    assert mem in body["detail"]
    assert "original" in body["detail"]
    # Another role of the same memory is fine, and the original is untouched.
    thumb = os.urandom(50)
    s = api.session(cap, len(thumb), memory_id=mem, role="thumb")
    complete(api, s, thumb)
    assert api.read(mem).content == original
    assert api.read(mem, "thumb").content == thumb


def test_409_second_concurrent_session_for_the_same_memory_and_role(api: Api) -> None:
    cap = api.capsule()
    r = api.http.post(f"/v1/capsules/{cap}/memories", json={"title": "t"})
    assert r.status_code == 201, r.text
    mem = r.json()["id"]
    data = os.urandom(CHUNK + 5)
    first = api.session(cap, len(data), memory_id=mem, role="display")
    assert api.put(first, 0, data).status_code == 200
    body = problem(api.begin(cap, len(data), memory_id=mem, role="display"), 409, "conflict")
    assert body["target"] == f"{mem}/display", body
    assert "in progress" in body["detail"]
    # Other roles are independent.
    other_role = api.begin(cap, 10, memory_id=mem, role="thumb")
    assert other_role.status_code == 201, other_role.text
    # The first session is intact and finishes.
    assert status_of(api, first["id"])["received"] == [0]
    done = complete(api, first, data)
    assert done["memory_id"] == mem
    # Once it has committed, the role is taken for good.
    problem(api.begin(cap, len(data), memory_id=mem, role="display"), 409, "conflict")


def test_second_session_for_memory_and_role_may_begin_after_abort(api: Api) -> None:
    cap = api.capsule()
    mem = api.http.post(f"/v1/capsules/{cap}/memories", json={}).json()["id"]
    first = api.session(cap, 10, memory_id=mem, role="display")
    problem(api.begin(cap, 10, memory_id=mem, role="display"), 409, "conflict")
    assert api.http.delete(f"/v1/uploads/{first['id']}").status_code == 204
    # Aborting a session for an existing memory leaves the memory alone.
    assert api.http.get(f"/v1/memories/{mem}").status_code == 200
    data = os.urandom(10)
    second = api.session(cap, len(data), memory_id=mem, role="display")
    assert complete(api, second, data)["memory_id"] == mem


def test_409_finish_of_a_committed_session_with_another_digest(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(CHUNK + 3)
    s = api.session(cap, len(data))
    done = complete(api, s, data)
    other = os.urandom(len(data))
    body = problem(api.finish(s, data, sha256=sha(other)), 409, "conflict")
    assert body["sha256"] == sha(data), body
    assert body["size"] == len(data), body
    assert "already committed" in body["detail"]
    r = api.http.post(f"/v1/uploads/{s['id']}/finish", json={"size": len(data) + 1,
                                                            "sha256": sha(data)})
    problem(r, 409, "conflict")
    # Repeating the same finish is a retry and answers the same result.
    again = api.finish(s, data)
    assert again.status_code == 200, again.text
    # The same commit; the memory beside it reads as it is now (its derivatives move on).
    assert {**again.json(), "memory": None} == {**done, "memory": None}
    assert again.json()["memory"]["assets"]["original"] == done["asset"]
    assert api.read(done["memory_id"]).content == data


def test_409_abort_of_a_committed_session(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(500)
    s = api.session(cap, len(data))
    done = complete(api, s, data)
    body = problem(api.http.delete(f"/v1/uploads/{s['id']}"), 409, "conflict")
    assert "committed" in body["detail"]
    assert body["state"] == "committed"  # as a chunk for it says
    assert api.read(done["memory_id"]).content == data
    assert api.finish(s, data).status_code == 200


def test_status_of_a_committed_session_counts_every_chunk(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(2 * CHUNK + 5)
    s = api.session(cap, len(data))
    complete(api, s, data)
    status = api.http.get(f"/v1/uploads/{s['id']}").json()
    assert status["state"] == "committed"
    assert (status["received"], status["received_count"], status["bytes_received"]) == (
        [0, 1, 2], 3, len(data))


def test_409_put_chunk_into_a_committed_session(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(CHUNK + 3)
    s = api.session(cap, len(data))
    done = complete(api, s, data)
    r = api.put(s, 0, data)
    body = problem(r, 409, "conflict")
    assert body["state"] == "committed"
    assert api.read(done["memory_id"]).content == data


# -- 422 checksum_mismatch / length_mismatch -------------------------------------------------


def test_422_finish_with_the_wrong_sha256_then_the_right_one(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(2 * CHUNK + 77)
    s = api.session(cap, len(data))
    for i in range(s["chunk_count"]):
        assert api.put(s, i, data).status_code == 200
    wrong = sha(b"something else")
    body = problem(api.finish(s, data, sha256=wrong), 422, "checksum_mismatch")
    assert body["expected"] == wrong
    assert body["computed"] == sha(data)
    assert "SHA-256" in body["detail"]
    st = status_of(api, s["id"])
    assert st["state"] == "pending"
    assert st["received"] == [0, 1, 2]
    complete(api, s, data)


def test_422_chunk_with_wrong_sha256_content_digest(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(2 * CHUNK + 10)
    s = api.session(cap, len(data))
    assert api.put(s, 0, data).status_code == 200
    good = piece(s, data, 1)
    bad = bytearray(good)
    bad[100] ^= 0x80
    r = put_raw(api, s["id"], 1, bytes(bad), {"Content-Digest": digest_header(good)})
    body = problem(r, 422, "checksum_mismatch")
    assert body["expected"] == sha(good)
    assert body["computed"] == sha(bytes(bad))
    assert "SHA-256" in body["detail"]
    assert "Content-Digest" in body["detail"]
    st = status_of(api, s["id"])
    assert st["received"] == [0]
    assert st["bytes_received"] == CHUNK
    r = put_raw(api, s["id"], 1, good, {"Content-Digest": digest_header(good)})
    assert r.status_code == 200, r.text
    assert r.json()["duplicate"] is False
    complete(api, s, data)


def test_422_chunk_with_wrong_crc32c_content_digest(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(2 * CHUNK + 10)
    s = api.session(cap, len(data))
    good = piece(s, data, 0)
    bad = bytes([good[0] ^ 1]) + good[1:]
    header = digest_header(good, sha256=False, crc=True)
    body = problem(put_raw(api, s["id"], 0, bad, {"Content-Digest": header}),
                   422, "checksum_mismatch")
    assert body["expected"] == f"{crc32c.crc32c(good):08x}"
    assert body["computed"] == f"{crc32c.crc32c(bad):08x}"
    assert "CRC32C" in body["detail"]
    st = status_of(api, s["id"])
    assert st["received"] == []
    assert st["bytes_received"] == 0
    # The right bytes under the same header are accepted, as the first copy of the chunk.
    r = put_raw(api, s["id"], 0, good, {"Content-Digest": header})
    assert r.status_code == 200, r.text
    assert r.json()["duplicate"] is False
    complete(api, s, data)


def test_422_content_digest_sent_on_two_header_lines(api: Api) -> None:
    """Two field lines mean one comma-joined value (RFC 9110 §5.3): a wrong digest on the
    second line is checked like one on the first."""
    cap = api.capsule()
    data = os.urandom(CHUNK + 10)
    s = api.session(cap, len(data))
    good = piece(s, data, 0)
    other = b"y" * len(good)
    sha_right = digest_header(good)
    crc_right = digest_header(good, sha256=False, crc=True)
    for lines in ([sha_right, digest_header(other, sha256=False, crc=True)],
                  [crc_right, digest_header(other)]):
        r = api.http.put(f"/v1/uploads/{s['id']}/chunks/0", content=good,
                         headers=[("Content-Digest", line) for line in lines])
        problem(r, 422, "checksum_mismatch")
        assert status_of(api, s["id"])["received"] == []
    r = api.http.put(f"/v1/uploads/{s['id']}/chunks/0", content=good,
                     headers=[("Content-Digest", sha_right), ("Content-Digest", crc_right)])
    assert r.status_code == 200, r.text
    complete(api, s, data)


def test_422_wrong_content_digest_on_a_duplicate_chunk(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(CHUNK + 10)
    s = api.session(cap, len(data))
    good = piece(s, data, 0)
    assert api.put(s, 0, data).status_code == 200
    wrong = digest_header(b"x" * len(good), crc=True)
    problem(put_raw(api, s["id"], 0, good, {"Content-Digest": wrong}), 422, "checksum_mismatch")
    assert status_of(api, s["id"])["received"] == [0]
    complete(api, s, data)


def test_right_content_digest_is_accepted(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(3 * CHUNK + 10)
    s = api.session(cap, len(data))
    unknown_alg = "md5=:" + base64.b64encode(hashlib.md5(piece(s, data, 3)).digest()).decode()
    headers = [
        digest_header(piece(s, data, 0)),
        digest_header(piece(s, data, 1), sha256=False, crc=True),
        digest_header(piece(s, data, 2), crc=True),
        unknown_alg + ":",  # algorithms the server does not check are ignored
    ]
    for i, header in enumerate(headers):
        r = put_raw(api, s["id"], i, piece(s, data, i), {"Content-Digest": header})
        assert r.status_code == 200, (header, r.text)
        assert r.json()["index"] == i
        assert r.json()["duplicate"] is False
    # A duplicate with a right digest is a duplicate.
    r = put_raw(api, s["id"], 0, piece(s, data, 0), {"Content-Digest": headers[0]})
    assert r.status_code == 200
    assert r.json()["duplicate"] is True
    complete(api, s, data)


def test_422_finish_sha256_differs_from_the_one_declared_at_begin(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(CHUNK + 20)
    s = api.session(cap, len(data), sha256=sha(data))
    for i in range(s["chunk_count"]):
        assert api.put(s, i, data).status_code == 200
    other = sha(b"other")
    body = problem(api.finish(s, data, sha256=other), 422, "checksum_mismatch")
    assert body["declared"] == sha(data)
    assert body["given"] == other
    assert "begin" in body["detail"]
    assert status_of(api, s["id"])["state"] == "pending"
    complete(api, s, data)


def test_422_declared_sha256_that_the_bytes_do_not_have(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(CHUNK + 20)
    declared = sha(b"not these bytes")
    s = api.session(cap, len(data), sha256=declared)
    for i in range(s["chunk_count"]):
        assert api.put(s, i, data).status_code == 200
    body = problem(api.finish(s, data, sha256=declared), 422, "checksum_mismatch")
    assert body["computed"] == sha(data)
    assert status_of(api, s["id"])["state"] == "pending"
    assert api.http.delete(f"/v1/uploads/{s['id']}").status_code == 204


def test_422_length_mismatch_at_finish(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(CHUNK + 20)
    s = api.session(cap, len(data))
    for i in range(s["chunk_count"]):
        assert api.put(s, i, data).status_code == 200
    for size in [len(data) - 1, len(data) + 1, 0]:
        r = api.http.post(f"/v1/uploads/{s['id']}/finish",
                          json={"size": size, "sha256": sha(data)})
        body = problem(r, 422, "length_mismatch")
        assert body["declared"] == len(data)
        assert body["given"] == size
        assert str(len(data)) in body["detail"]
        assert str(size) in body["detail"]
    assert status_of(api, s["id"])["state"] == "pending"
    complete(api, s, data)


# -- 409 incomplete --------------------------------------------------------------------------


def test_409_incomplete_lists_exactly_the_missing_chunks(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(6 * CHUNK + 1)
    s = api.session(cap, len(data))
    assert s["chunk_count"] == 7
    body = problem(api.finish(s, data), 409, "incomplete")
    assert body["missing"] == list(range(7))
    assert body["missing_count"] == 7
    for i in [0, 2, 3, 6]:
        assert api.put(s, i, data).status_code == 200
    body = problem(api.finish(s, data), 409, "incomplete")
    assert body["missing"] == [1, 4, 5]
    assert body["missing_count"] == 3
    assert "3 of 7" in body["detail"]
    assert status_of(api, s["id"])["received"] == [0, 2, 3, 6]
    complete(api, s, data)


# -- 410 expired, then 404 -------------------------------------------------------------------


def test_410_expired_then_404_after_grace(expiry_server: LiveServer) -> None:
    with client(expiry_server) as api:
        cap = api.capsule()
        data = os.urandom(2 * CHUNK + 1)
        s = api.session(cap, len(data))
        assert api.put(s, 0, data).status_code == 200
        touched = time.monotonic()
        staged = expiry_server.data_dir / "staging" / s["id"]
        assert staged.exists()
        mem = s["memory_id"]
        assert api.http.get(f"/v1/memories/{mem}").status_code == 200

        time.sleep(max(0.0, touched + 1.3 - time.monotonic()))
        answers = [
            ("status", api.http.get(f"/v1/uploads/{s['id']}")),
            ("put", api.put(s, 1, data)),
            ("re-put", api.put(s, 0, data)),
            ("finish", api.finish(s, data)),
        ]
        assert time.monotonic() - touched < 2.9, "too slow to observe the grace period"
        for what, r in answers:
            body = problem(r, 410, "expired")
            assert "expired" in body["detail"], (what, body)
            assert epoch(body["expired_at"]) <= time.time(), body

        # Expiry dropped the staging bytes and the memory the session had created.
        assert not staged.exists()
        problem(api.http.get(f"/v1/memories/{mem}"), 404, "not_found")
        assert api.http.get(f"/v1/capsules/{cap}/memories").json()["items"] == []
        assert s["id"] not in {x["id"] for x in api.http.get("/v1/uploads").json()["items"]}

        # After the grace period the reaper forgets it: 404 from then on.
        deadline = time.monotonic() + 15
        while True:
            r = api.http.get(f"/v1/uploads/{s['id']}")
            if r.status_code != 410 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        problem(r, 404, "not_found")
        problem(api.put(s, 1, data), 404, "not_found")
        problem(api.finish(s, data), 404, "not_found")
        # The capsule still takes new uploads.
        fresh = os.urandom(100)
        s2 = api.session(cap, len(fresh))
        complete(api, s2, fresh)


def test_expired_session_idle_reaped_without_being_asked(expiry_server: LiveServer) -> None:
    with client(expiry_server) as api:
        cap = api.capsule()
        s = api.session(cap, 10)
        staged = expiry_server.data_dir / "staging" / s["id"]
        assert staged.exists()
        deadline = time.monotonic() + 10
        while staged.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not staged.exists(), "the reaper did not expire the idle session"
        problem(api.http.get(f"/v1/memories/{s['memory_id']}"), 404, "not_found")


# -- 429 resource_exhausted ------------------------------------------------------------------


def test_429_too_many_pending_sessions_in_a_capsule(limits_server: LiveServer) -> None:
    with client(limits_server) as api:
        cap = api.capsule()
        sessions = [api.session(cap, 10, idempotency_key=f"k{i}") for i in range(3)]
        r = api.begin(cap, 10, idempotency_key="k3")
        body = problem(r, 429, "resource_exhausted")
        assert body["active"] == 3
        assert body["limit"] == 3
        assert body["limit_name"] == "pending_sessions_per_capsule"
        soonest = min(epoch(s["expires_at"]) for s in sessions)
        assert abs(epoch(body["soonest_expires_at"]) - soonest) < 1.0, body
        retry_after = int(r.headers["retry-after"])
        assert 1 <= retry_after <= 24 * 3600 + 1
        assert body["retry_after"] == pytest.approx(retry_after, abs=1)
        assert "3" in body["detail"]
        assert "abort" in body["detail"]
        # The memory of the refused begin was not made.
        memories = api.http.get(f"/v1/capsules/{cap}/memories").json()["items"]
        assert sorted(m["id"] for m in memories) == sorted(s["memory_id"] for s in sessions)

        # Another capsule is not affected.
        other_cap = api.capsule()
        assert api.begin(other_cap, 10).status_code == 201
        # A retried begin of a pending session is not a new session: 200, not 429.
        retry = api.begin(cap, 10, idempotency_key="k1")
        assert retry.status_code == 200, retry.text
        assert retry.json()["id"] == sessions[1]["id"]
        # Ending one frees a slot.
        assert api.http.delete(f"/v1/uploads/{sessions[0]['id']}").status_code == 204
        data = os.urandom(10)
        again = api.begin(cap, len(data), idempotency_key="k3")
        assert again.status_code == 201, again.text
        problem(api.begin(cap, 10, idempotency_key="k4"), 429, "resource_exhausted")
        # Finishing one frees a slot too.
        complete(api, again.json(), data)
        assert api.begin(cap, 10, idempotency_key="k4").status_code == 201


# -- 507 insufficient_storage ----------------------------------------------------------------


def test_507_insufficient_storage(full_disk_server: LiveServer) -> None:
    with client(full_disk_server) as api:
        cap = api.capsule()
        for size in [1, 1000, 5 * CHUNK]:
            body = problem(api.begin(cap, size), 507, "insufficient_storage")
            assert body["needed"] == size
            assert body["available"] == 0
            assert "storage" in body["detail"]
        # Nothing was left behind by the refused begins.
        assert api.http.get(f"/v1/capsules/{cap}/memories").json()["items"] == []
        assert api.http.get("/v1/uploads").json()["items"] == []
        assert list((full_disk_server.data_dir / "staging").iterdir()) == []


def test_retried_begin_is_not_refused_for_storage_it_already_holds(
    tight_disk_server: LiveServer,
) -> None:
    """A begin retried with its idempotency key reserves nothing new: 200, not 507."""
    with client(tight_disk_server) as api:
        cap = api.capsule()
        size = 1400 * MiB  # fits in the ~2 GiB left, but not twice
        first = api.begin(cap, size, idempotency_key="big")
        assert first.status_code == 201, first.text
        # A second, different upload of that size does not fit next to the first.
        body = problem(api.begin(cap, size, idempotency_key="big-2"), 507,
                       "insufficient_storage")
        assert body["needed"] == size
        assert body["available"] < size
        # The retry of the first is the same session, not a new reservation.
        retry = api.begin(cap, size, idempotency_key="big")
        assert retry.status_code == 200, retry.text
        assert retry.json()["id"] == first.json()["id"]
        assert api.http.delete(f"/v1/uploads/{first.json()['id']}").status_code == 204


# -- 500 internal ----------------------------------------------------------------------------


def test_500_when_the_blob_behind_an_asset_is_gone(api: Api, server: LiveServer) -> None:
    cap = api.capsule()
    data = os.urandom(2 * CHUNK + 3)
    done = api.upload(cap, data)
    mem = done["memory_id"]
    digest = sha(data)
    blob = server.data_dir / "blobs" / digest[:2] / digest[2:4] / digest
    assert blob.exists()
    blob.unlink()

    for headers in [{}, {"Range": "bytes=10-20"}, {"Range": f"bytes={CHUNK}-"}]:
        r = api.read(mem, **headers)
        body = problem(r, 500, "internal")
        assert "missing" in body["detail"], body
        assert "blobs/" not in r.text  # no storage paths leaked
        # HEAD answers as GET would, not 200 for bytes that cannot be served.
        head = api.http.head(f"/v1/memories/{mem}/assets/original", headers=headers)
        assert head.status_code == 500, head.headers
        assert head.headers["content-type"] == "application/problem+json"
    # The metadata still answers, and the server keeps serving everything else.
    assert api.http.get(f"/v1/memories/{mem}").status_code == 200
    assert api.http.get("/healthz").status_code == 200
    other = os.urandom(CHUNK + 1)
    again = api.upload(cap, other)
    assert api.read(again["memory_id"]).content == other


def test_500_from_an_unforeseen_failure_keeps_the_connection(api: Api,
                                                             server: LiveServer) -> None:
    """An exception no handler names (here ELOOP opening a blob made a symlink to itself) is
    the same problem document, logged once, and the keep-alive connection goes on serving:
    Starlette's last-resort handler re-raised after answering, and uvicorn then closed the
    connection without a ``Connection: close``, so the next request on it failed."""
    cap = api.capsule()
    data = os.urandom(CHUNK + 3)
    mem = api.upload(cap, data)["memory_id"]
    digest = sha(data)
    blob = server.data_dir / "blobs" / digest[:2] / digest[2:4] / digest
    blob.unlink()
    blob.symlink_to(blob.name)

    # http.client, not httpx: httpx would quietly open a new connection for a closed one.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    auth = {"Authorization": f"Bearer {server.token}"}

    def get(path: str) -> tuple[int, dict[str, str], bytes]:
        conn.request("GET", path, headers=auth)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()

    try:
        status, headers, content = get(f"/v1/memories/{mem}/assets/original")
        assert status == 500
        assert headers["content-type"] == "application/problem+json"
        assert json.loads(content)["code"] == "internal"
        assert json.loads(content)["detail"] == "internal error; the server log has the details"
        sock = conn.sock
        # The same connection serves the next requests.
        assert get("/healthz")[0] == 200
        assert get(f"/v1/memories/{mem}")[0] == 200
        assert get(f"/v1/memories/{mem}/assets/original")[0] == 500
        assert get("/healthz")[0] == 200
        assert conn.sock is sock
    finally:
        conn.close()
    assert server.log_path is not None
    log = server.log_path.read_text()
    assert log.count('"event": "request.failed"') == 2, log[-3000:]
    assert "Exception in ASGI application" not in log


# -- 503 unavailable -------------------------------------------------------------------------


@contextlib.contextmanager
def chunk0_standing_still(srv: LiveServer, api: Api, data: bytes, first: int
                          ) -> Iterator[tuple[dict[str, Any], list[httpx.Response | Exception]]]:
    """A session for ``data`` whose chunk 0 is being sent by another client, which sent
    ``first`` bytes and then stood still (its network went quiet, its connection open)
    until the block ends; yields the session and, once the block is over, that PUT's
    outcome."""
    s = api.session(api.capsule(), len(data))
    body = piece(s, data, 0)
    release = threading.Event()
    outcome: list[httpx.Response | Exception] = []

    def stalled_body() -> Iterator[bytes]:
        yield body[:first]
        release.wait(60)
        yield body[first:]

    def send() -> None:
        with raw_client(srv, {"Authorization": f"Bearer {srv.token}"}) as h:
            try:
                outcome.append(h.put(f"/v1/uploads/{s['id']}/chunks/0", content=stalled_body(),
                                     headers={"Content-Length": str(len(body))}))
            except httpx.HTTPError as exc:
                outcome.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    try:
        time.sleep(0.5)  # the stalled request holds chunk 0 now
        yield s, outcome
    finally:
        release.set()
        thread.join(60)


def test_503_when_a_concurrent_transfer_of_the_same_chunk_fails(slow_server: LiveServer) -> None:
    with client(slow_server) as api:
        data = os.urandom(2 * CHUNK + 1)
        with chunk0_standing_still(slow_server, api, data, 1000) as (s, _):
            r = api.put(s, 0, data)
        body = problem(r, 503, "unavailable")
        assert int(r.headers["retry-after"]) >= 1
        assert "send it again" in body["detail"] or "still being written" in body["detail"]
        assert status_of(api, s["id"])["received"] == []
        # The retry the 503 asks for succeeds, and the upload completes.
        again = api.put(s, 0, data)
        assert again.status_code == 200, again.text
        complete(api, s, data)


@pytest.fixture(scope="module")
def short_lease_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # No slow-body rate: only the claim's lease can free a chunk whose body stands still.
    with dedicated(tmp_path_factory, "lease", MEMVAULT_CLAIM_LEASE="1.5",
                   MEMVAULT_MIN_TRANSFER_RATE="0") as srv:
        yield srv


def test_a_retry_takes_over_a_chunk_whose_body_stood_still(
    short_lease_server: LiveServer,
) -> None:
    """A body that stops arriving stops renewing its claim: after one lease a retry of the
    chunk gets 503 with Retry-After, and the retry after that takes the chunk over (the
    stalled transfer lets go of it). Before, the holder renewed its claim for as long as its
    request lived, up to the slow-body deadline or MEMVAULT_CHUNK_TIMEOUT (minutes), and
    every retry waited that long."""
    srv = short_lease_server
    with client(srv) as api:
        data = os.urandom(2 * CHUNK + 1)
        with chunk0_standing_still(srv, api, data, CHUNK // 2) as (s, outcome):
            answers = []
            with raw_client(srv, {"Authorization": f"Bearer {srv.token}"}) as h:
                h.timeout = httpx.Timeout(30)  # without the fix: a ReadTimeout here
                for _ in range(20):
                    r = h.put(f"/v1/uploads/{s['id']}/chunks/0", content=piece(s, data, 0))
                    answers.append(r)
                    if r.status_code != 503:
                        break
                    assert problem(r, 503, "unavailable")
                    time.sleep(float(r.headers["retry-after"]) / 4)
            assert answers[-1].status_code == 200, [a.text for a in answers]
            assert status_of(api, s["id"])["received"] == [0]
        # The stalled request, if its client still hears, was told it lost the chunk.
        assert len(outcome) == 1
        if isinstance(outcome[0], httpx.Response):
            assert problem(outcome[0], 503, "unavailable")
            assert "taken over" in outcome[0].json()["detail"]
        complete(api, s, data)


def test_a_body_that_pauses_longer_than_a_lease_still_counts_if_nobody_took_over(
    short_lease_server: LiveServer,
) -> None:
    with client(short_lease_server) as api:
        data = os.urandom(CHUNK + 1)
        with chunk0_standing_still(short_lease_server, api, data, CHUNK // 2) as (s, outcome):
            time.sleep(3 * 1.5)  # three leases without a byte
        assert isinstance(outcome[0], httpx.Response), outcome
        assert outcome[0].status_code == 200, outcome[0].text
        assert status_of(api, s["id"])["received"] == [0]
        complete(api, s, data)


def test_chunk_slower_than_chunk_timeout_is_not_an_internal_error(
    slow_server: LiveServer,
) -> None:
    """Running past MEMVAULT_CHUNK_TIMEOUT is the client's doing: a typed problem, not 500."""
    with client(slow_server) as api:
        cap = api.capsule()
        data = os.urandom(CHUNK + 1)
        s = api.session(cap, len(data))
        chunk0 = piece(s, data, 0)

        def slow_body() -> Iterator[bytes]:
            yield chunk0[:1000]
            time.sleep(3)  # past the server's 2 s chunk timeout
            yield chunk0[1000:]

        r = api.http.put(f"/v1/uploads/{s['id']}/chunks/0", content=slow_body(),
                         headers={"Content-Length": str(len(chunk0))})
        assert r.headers["content-type"].startswith("application/problem+json"), r.text
        assert r.json()["code"] != "internal", r.text
        assert r.status_code != 500, r.text
        assert status_of(api, s["id"])["received"] == []
        complete(api, s, data)


# -- reads: 416, 304, 206 --------------------------------------------------------------------


def test_416_range_past_the_end(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(1000)
    mem = api.upload(cap, data)["memory_id"]
    for rng in ["bytes=1000-", "bytes=1000-1010", "bytes=5000-6000", "bytes=-0"]:
        body = problem(api.read(mem, Range=rng), 416, "range_not_satisfiable")
        assert body["size"] == 1000, (rng, body)
    # The asset still reads in full and by a satisfiable range.
    assert api.read(mem).content == data
    assert api.read(mem, Range="bytes=999-").content == data[999:]


def test_416_carries_content_range_with_the_size(api: Api) -> None:
    """RFC 9110 §15.5.17: a 416 to a byte-range request SHOULD send ``bytes */<size>``."""
    cap = api.capsule()
    mem = api.upload(cap, os.urandom(1000))["memory_id"]
    r = api.read(mem, Range="bytes=1000-")
    problem(r, 416, "range_not_satisfiable")
    assert r.headers.get("content-range") == "bytes */1000", r.headers


def test_suffix_range_of_an_empty_asset_is_416(api: Api) -> None:
    """RFC 9110 §14.1.2: a suffix range of a zero-length representation is unsatisfiable."""
    cap = api.capsule()
    mem = api.upload(cap, b"")["memory_id"]
    for rng in ["bytes=-5", "bytes=0-"]:
        r = api.read(mem, Range=rng)
        assert r.headers.get("content-range") != "bytes 0--1/0", (rng, r.headers)
        body = problem(r, 416, "range_not_satisfiable")
        assert body["size"] == 0
    plain = api.read(mem)
    assert plain.status_code == 200
    assert plain.content == b""


def test_304_if_none_match(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(CHUNK + 1)
    mem = api.upload(cap, data)["memory_id"]
    etag = api.read(mem).headers["etag"]
    assert etag == f'"{sha(data)}"'
    for header in [etag, f"W/{etag}", f'"nope", {etag}', "*"]:
        r = api.read(mem, **{"If-None-Match": header})
        assert r.status_code == 304, (header, r.status_code)
        assert r.content == b""
        assert r.headers["etag"] == etag
    r = api.read(mem, **{"If-None-Match": '"something-else"'})
    assert r.status_code == 200
    assert r.content == data


def test_412_if_match_names_another_version(api: Api) -> None:
    """RFC 9110 §13.1.1: If-Match compares strongly and is checked before If-None-Match."""
    cap = api.capsule()
    data = os.urandom(CHUNK + 1)
    mem = api.upload(cap, data)["memory_id"]
    etag = f'"{sha(data)}"'
    for header in ['"something-else"', f"W/{etag}"]:
        for method in ("GET", "HEAD"):
            r = api.http.request(method, f"/v1/memories/{mem}/assets/original",
                                 headers={"If-Match": header, "If-None-Match": etag})
            assert r.status_code == 412, (header, method, r.status_code)
            if method == "GET":
                body = problem(r, 412, "precondition_failed")
                assert body["etag"] == etag
    # A list sent on two field lines is one list (RFC 9110 §5.3).
    two_lines = [("If-None-Match", '"other"'), ("If-None-Match", etag)]
    assert api.http.get(f"/v1/memories/{mem}/assets/original",
                        headers=two_lines).status_code == 304
    two_lines = [("If-Match", '"other"'), ("If-Match", etag)]
    assert api.http.get(f"/v1/memories/{mem}/assets/original",
                        headers=two_lines).status_code == 200
    for header in [etag, f'"nope", {etag}', "*"]:
        r = api.read(mem, **{"If-Match": header, "Range": "bytes=0-9"})
        assert r.status_code == 206, (header, r.text)
        assert r.content == data[:10]


def test_206_range_read(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(2 * CHUNK + 500)
    size = len(data)
    mem = api.upload(cap, data)["memory_id"]
    cases = [
        ("bytes=0-9", 0, 10),
        ("bytes=10-", 10, size),
        ("bytes=-5", size - 5, size),
        (f"bytes={CHUNK - 3}-{CHUNK + 3}", CHUNK - 3, CHUNK + 4),
        (f"bytes=100-{size + 1000}", 100, size),  # an end past the size is clipped
        (f"bytes=-{size + 10}", 0, size),
    ]
    for rng, start, end in cases:
        r = api.read(mem, Range=rng)
        assert r.status_code == 206, (rng, r.text)
        assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{size}", rng
        assert int(r.headers["content-length"]) == end - start
        assert r.content == data[start:end], rng
    # If-Range with a different validator means "send it all".
    r = api.read(mem, Range="bytes=0-9", **{"If-Range": '"stale"'})
    assert r.status_code == 200
    assert r.content == data


# -- abort -----------------------------------------------------------------------------------


def test_abort_removes_the_session_its_bytes_and_its_memory(api: Api, server: LiveServer) -> None:
    cap = api.capsule()
    data = os.urandom(2 * CHUNK + 1)
    s = api.session(cap, len(data), idempotency_key="abort-me")
    assert api.put(s, 0, data).status_code == 200
    staged = server.data_dir / "staging" / s["id"]
    assert staged.exists()
    mem = s["memory_id"]
    assert api.http.get(f"/v1/memories/{mem}").status_code == 200

    r = api.http.delete(f"/v1/uploads/{s['id']}")
    assert r.status_code == 204
    assert r.content == b""
    problem(api.http.get(f"/v1/uploads/{s['id']}"), 404, "not_found")
    assert not staged.exists()
    problem(api.http.get(f"/v1/memories/{mem}"), 404, "not_found")
    assert api.http.get(f"/v1/capsules/{cap}/memories").json()["items"] == []
    assert s["id"] not in {x["id"] for x in api.http.get("/v1/uploads").json()["items"]}
    problem(api.http.delete(f"/v1/uploads/{s['id']}"), 404, "not_found")
    problem(api.put(s, 1, data), 404, "not_found")
    # A finish that lost a race with the abort is told the session may have been aborted.
    assert "aborted" in problem(api.finish(s, data), 404, "not_found")["detail"]
    # The idempotency key is free again: the same begin makes a new session.
    fresh = api.begin(cap, len(data), idempotency_key="abort-me")
    assert fresh.status_code == 201, fresh.text
    assert fresh.json()["id"] != s["id"]
    complete(api, fresh.json(), data)
