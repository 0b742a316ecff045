"""Values no store or header can carry are refused at the door, and nothing is written.

Found by a review (2026-11-24): each of these was accepted once and then broke a read (a
500 on every later GET of the memory or the whole capsule listing, an asset whose bytes
could not be served), or was a 500 by itself. The HTTP tests run on the module's shared
server (SQLite); the service tests run on SQLite and PostgreSQL, where U+0000 and NaN are
refused by the database itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
from typing import Any

import httpx
import pytest

from memvault.errors import InvalidArgument, NotFound
from memvault.uploads import BeginRequest
from tests.conftest import LiveServer
from tests.helpers import Api, problem
from tests.inprocess import inprocess


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def memory_ids(api: Api, cap: str) -> list[str]:
    r = api.http.get(f"/v1/capsules/{cap}/memories")
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["items"]]


def test_unstorable_text_is_refused_before_anything_is_written(api: Api) -> None:
    cap = api.capsule()
    done = api.upload(cap, b"kept")
    mem = done["memory_id"]
    before = api.http.get(f"/v1/memories/{mem}").json()

    base = {"capsule_id": cap, "filename": "f.jpg", "size": 3, "idempotency_key": "k"}
    refused: list[tuple[str, httpx.Response]] = [
        ("capsule name with U+0000", api.http.post("/v1/capsules", json={"name": "a\x00b"})),
        ("title with U+0000", api.http.post(f"/v1/capsules/{cap}/memories",
                                            json={"title": "a\x00b"})),
        ("title with a line break", api.http.post(f"/v1/capsules/{cap}/memories",
                                                  json={"title": "a\nb"})),
        ("metadata 300 deep", api.http.post(f"/v1/capsules/{cap}/memories",
                                            json={"metadata": {"a": nested(300)}})),
        ("metadata NaN", api.http.post(
            f"/v1/capsules/{cap}/memories", content=b'{"metadata": {"x": NaN}}',
            headers={"Content-Type": "application/json"})),
        ("metadata key with U+0000", api.http.post(f"/v1/capsules/{cap}/memories",
                                                   json={"metadata": {"a\x00": 1}})),
        ("patch metadata 300 deep", api.http.patch(f"/v1/memories/{mem}",
                                                   json={"metadata": {"a": nested(300)}})),
        ("patch title with U+0000", api.http.patch(f"/v1/memories/{mem}",
                                                   json={"title": "x\x00"})),
        ("filename with U+0000", api.http.post("/v1/uploads",
                                               json={**base, "filename": "photo\x00.jpg"})),
        ("idempotency key with U+0000", api.http.post(
            "/v1/uploads", json={**base, "idempotency_key": "k\x00"})),
        ("content type with emoji", api.http.post(
            "/v1/uploads", json={**base, "content_type": "image/jpeg; name=\U0001f600"})),
        ("content type with a header break", api.http.post(
            "/v1/uploads", json={**base, "content_type": "text/plain\r\nX-Injected: 1"})),
        ("content type without a subtype", api.http.post(
            "/v1/uploads", json={**base, "content_type": "jpeg"})),
    ]
    for what, r in refused:
        body = problem(r, 400, "invalid_argument")
        assert body["detail"], what

    # Nothing was written: the capsule holds its one memory, unchanged, readable.
    assert memory_ids(api, cap) == [mem]
    assert api.http.get(f"/v1/memories/{mem}").json() == before
    items = api.http.get("/v1/uploads").json()["items"]
    assert [s for s in items if s["capsule_id"] == cap] == []
    names = [c["name"] for c in api.http.get("/v1/capsules").json()]
    assert not any("\x00" in n for n in names)


def test_what_stores_and_headers_carry_is_kept_as_given(api: Api) -> None:
    cap = api.capsule()
    meta = {"caption": "line one\nline two\ttabbed", "tags": ["été", "家族"],
            "deep": nested(30), "n": 1.5, "ok": True, "none": None}
    r = api.http.post(f"/v1/capsules/{cap}/memories",
                      json={"title": "Été 2026 — 家族", "metadata": meta})
    assert r.status_code == 201, r.text
    mem = r.json()["id"]
    got = api.http.get(f"/v1/memories/{mem}").json()
    assert got["metadata"] == meta
    assert got["title"] == "Été 2026 — 家族"

    data = os.urandom(1000)
    done = api.upload(cap, data, memory_id=mem, filename="Été 家族.jpg",
                      content_type='text/plain; charset="utf-8"; format=flowed')
    read = api.read(done["memory_id"])
    assert read.status_code == 200
    assert read.content == data
    assert read.headers["content-type"].startswith('text/plain; charset="utf-8"')
    html = api.upload(cap, b"<script>alert(document.domain)</script>", filename="x.html",
                      content_type="text/html")
    page = api.read(html["memory_id"])
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["content-security-policy"] == "sandbox"  # scripts never run here
    # A file name is taken as the client's file system has it (macOS puts an "Icon\r" in
    # every folder with a custom icon); it reaches a header only percent-encoded.
    for filename in ("Icon\r", "tab\tname.jpg"):
        odd = api.upload(cap, os.urandom(50), filename=filename)
        read = api.read(odd["memory_id"])
        assert read.status_code == 200
        assert read.headers["content-disposition"] == (
            "inline; filename*=UTF-8''" + filename.replace("\r", "%0D").replace("\t", "%09"))
        assert odd["asset"]["filename"] == filename


def test_an_asset_is_served_with_its_stored_type_and_an_encoded_name(api: Api) -> None:
    """The type exactly as stored (no charset added to a text/ type: a Latin-1 file would
    then read as UTF-8), a "/" in the name percent-encoded (RFC 8187), and a range unit in
    any case (RFC 9110 §14.1)."""
    cap = api.capsule()
    latin = "Grüße aus Köln".encode("latin-1")
    done = api.upload(cap, latin, filename="notes 1/2.txt", content_type="text/plain")
    for method in ("GET", "HEAD"):
        read = api.http.request(method, f"/v1/memories/{done['memory_id']}/assets/original")
        assert read.status_code == 200
        assert read.headers["content-type"] == "text/plain", method
        assert read.headers["content-disposition"] == (
            "inline; filename*=UTF-8''notes%201%2F2.txt"), method
    assert api.read(done["memory_id"]).content == latin
    for unit in ("bytes", "Bytes", "BYTES"):
        part = api.read(done["memory_id"], Range=f"{unit}=0-4")
        assert part.status_code == 206, unit
        assert part.content == latin[:5]


def test_ids_no_server_issues_are_404(api: Api) -> None:
    cap = api.capsule()
    mem = api.upload(cap, b"x")["memory_id"]
    s = api.session(cap, 10)
    for bad_mem in ["mem_%00", f"{mem}%00", "mem_" + "g" * 32, mem.upper()]:
        problem(api.http.get(f"/v1/memories/{bad_mem}"), 404, "not_found")
        problem(api.read(bad_mem), 404, "not_found")
        problem(api.http.patch(f"/v1/memories/{bad_mem}", json={"title": "t"}), 404,
                "not_found")
    for bad_cap in ["cap_%00", f"{cap}%00"]:
        problem(api.http.get(f"/v1/capsules/{bad_cap}/memories"), 404, "not_found")
    for bad_ses in ["ses_%00", f"{s['id']}%00"]:
        problem(api.http.get(f"/v1/uploads/{bad_ses}"), 404, "not_found")
        problem(api.http.put(f"/v1/uploads/{bad_ses}/chunks/0", content=b"x" * 10), 404,
                "not_found")
        problem(api.http.delete(f"/v1/uploads/{bad_ses}"), 404, "not_found")
    problem(api.begin("cap_\x00", 10), 404, "not_found")
    problem(api.begin(cap, 10, memory_id="mem_\x00", role="thumb"), 404, "not_found")
    # The real ones are untouched.
    assert api.http.get(f"/v1/uploads/{s['id']}").json()["state"] == "pending"
    assert api.read(mem).content == b"x"


def test_forged_cursors_are_400(api: Api) -> None:
    cap = api.capsule()
    api.upload(cap, b"a")
    url = f"/v1/capsules/{cap}/memories"

    def cursor(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    forged = [
        cursor(b'[1' + b"0" * 400 + b', "mem_' + b"0" * 32 + b'"]'),  # float overflow
        cursor(b"[" * 5000 + b"]" * 5000),  # recursion
        cursor(b'[NaN, "mem_' + b"0" * 32 + b'"]'),
        cursor(b'[Infinity, "mem_' + b"0" * 32 + b'"]'),
        cursor(b'[true, "mem_' + b"0" * 32 + b'"]'),
        cursor(b'[1.0, "x"]'),
        cursor(b'[1.0, "mem_\\u0000"]'),
    ]
    for c in forged:
        body = problem(api.http.get(url, params={"cursor": c}), 400, "invalid_argument")
        assert "cursor" in body["detail"]


def test_a_range_past_any_size_is_ignored(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(5000)
    mem = api.upload(cap, data)["memory_id"]
    for header in ["bytes=0-" + "9" * 4301, "bytes=" + "9" * 4301 + "-", "bytes=-" + "9" * 4301]:
        r = api.read(mem, Range=header)
        assert r.status_code == 200, (header[:20], r.text[:200])
        assert r.content == data
    # 19 digits is still a range: beyond the end, clamped.
    r = api.read(mem, Range="bytes=4990-" + "9" * 19)
    assert r.status_code == 206
    assert r.content == data[4990:]


def test_head_of_an_asset_answers_its_headers_without_the_bytes(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(3000)
    mem = api.upload(cap, data, content_type="image/png")["memory_id"]
    r = api.http.head(f"/v1/memories/{mem}/assets/original")
    assert r.status_code == 200
    assert r.content == b""
    assert r.headers["content-length"] == "3000"
    assert r.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert r.headers["content-type"] == "image/png"
    r = api.http.head(f"/v1/memories/{mem}/assets/original", headers={"Range": "bytes=0-9"})
    assert r.status_code == 206
    assert r.headers["content-length"] == "10"
    assert r.headers["content-range"] == "bytes 0-9/3000"


def test_a_stored_type_no_header_can_carry_is_served_as_plain_bytes(
        api: Api, server: LiveServer) -> None:
    """Rows written before begin checked the type (a data folder from an older version)."""
    cap = api.capsule()
    data = os.urandom(100)
    mem = api.upload(cap, data)["memory_id"]
    with sqlite3.connect(server.data_dir / "memvault.db") as db:
        db.execute("UPDATE assets SET content_type = ? WHERE memory_id = ?",
                   ("image/jpeg; name=\U0001f600", mem))
    r = api.read(mem)
    assert r.status_code == 200
    assert r.content == data
    assert r.headers["content-type"] == "application/octet-stream"


def test_409_idempotency_key_reused_for_another_target(api: Api) -> None:
    cap = api.capsule()
    m1 = api.upload(cap, b"one")["memory_id"]
    m2 = api.upload(cap, b"two")["memory_id"]
    first = api.session(cap, 1, idempotency_key="kt", memory_id=m1, role="thumb")
    variants: list[dict[str, Any]] = [
        {"memory_id": m2, "role": "thumb"},
        {"memory_id": m1, "role": "display"},
        {"memory_id": m1, "role": "thumb", "filename": "other.bin"},
        {"memory_id": m1, "role": "thumb", "content_type": "image/png"},
        {},  # a new memory
    ]
    for extra in variants:
        body = problem(api.begin(cap, 1, idempotency_key="kt", **extra), 409, "conflict")
        assert body["session_id"] == first["id"]
        assert "idempotency key" in body["detail"]
        assert body["differs"]
    retry = api.begin(cap, 1, idempotency_key="kt", memory_id=m1, role="thumb")
    assert retry.status_code == 200
    assert retry.json()["id"] == first["id"]
    # No session was begun for any of the variants.
    items = api.http.get("/v1/uploads").json()["items"]
    assert [s["id"] for s in items if s["capsule_id"] == cap] == [first["id"]]


def test_metadata_depth_counts_objects_and_arrays(api: Api) -> None:
    """At most 32 nested objects and arrays; the scalar the innermost holds is not a level."""
    cap = api.capsule()
    at_limit = {"a": nested(31)}  # the object, then 31 arrays: 32 levels
    r = api.http.post(f"/v1/capsules/{cap}/memories", json={"metadata": at_limit})
    assert r.status_code == 201, r.text
    assert r.json()["metadata"] == at_limit
    body = problem(api.http.post(f"/v1/capsules/{cap}/memories",
                                 json={"metadata": {"a": nested(32)}}), 400, "invalid_argument")
    assert body["limit"] == 32


def test_bodies_with_unknown_fields_or_loosely_typed_values_are_400(api: Api) -> None:
    """A misspelled field is refused, not dropped (``memoryId`` made a new memory), and a
    JSON value keeps its type (``true`` was a size of 1, ``"10"`` a size of 10)."""
    cap = api.capsule()
    mem = api.upload(cap, b"kept")["memory_id"]
    base = {"capsule_id": cap, "filename": "f.bin", "size": 10, "idempotency_key": "k"}
    before = memory_ids(api, cap)
    refused: list[tuple[str, httpx.Response, str]] = [
        ("memoryId", api.http.post("/v1/uploads", json={**base, "memoryId": mem}), "memoryId"),
        ("size true", api.http.post("/v1/uploads", json={**base, "size": True}), "size"),
        ("size '10'", api.http.post("/v1/uploads", json={**base, "size": "10"}), "size"),
        ("size 10.0", api.http.post("/v1/uploads", json={**base, "size": 10.0}), "size"),
        ("capsule bogus", api.http.post("/v1/capsules", json={"name": "x", "bogus": 1}),
         "bogus"),
        ("memory titel", api.http.post(f"/v1/capsules/{cap}/memories", json={"titel": "x"}),
         "titel"),
        ("title 5", api.http.post(f"/v1/capsules/{cap}/memories", json={"title": 5}), "title"),
    ]
    for what, r, field in refused:
        body = problem(r, 400, "invalid_argument")
        assert field in body["detail"], (what, body)
    assert memory_ids(api, cap) == before
    assert [c["name"] for c in api.http.get("/v1/capsules").json()].count("x") == 0
    assert not [s for s in api.http.get("/v1/uploads").json()["items"]
                if s["capsule_id"] == cap]
    # The same requests, well typed, are accepted.
    s = api.http.post("/v1/uploads", json={**base, "memory_id": mem, "role": "thumb"})
    assert s.status_code == 201, s.text
    assert s.json()["memory_id"] == mem
    sid = s.json()["id"]
    assert api.http.put(f"/v1/uploads/{sid}/chunks/0", content=b"0123456789").status_code == 200
    digest = hashlib.sha256(b"0123456789").hexdigest()
    problem(api.http.post(f"/v1/uploads/{sid}/finish", json={"size": "10", "sha256": digest}),
            400, "invalid_argument")
    done = api.http.post(f"/v1/uploads/{sid}/finish", json={"size": 10, "sha256": digest})
    assert done.status_code == 200, done.text


async def test_unstorable_values_never_reach_the_database(database_url: str | None) -> None:
    """PostgreSQL refuses U+0000 in text and NaN in JSON: these used to be 500s there, and a
    file name with U+0000 let every chunk in, then failed every finish."""
    async with inprocess(database_url=database_url) as ip:
        for bad in ["ses_\x00", "ses_" + "0" * 31 + "\x00"]:
            with pytest.raises(NotFound):
                await ip.uploads.status(ip.caller, bad)
        for bad in ["mem_\x00", "mem_x"]:
            with pytest.raises(NotFound):
                await ip.capsules.get_memory(ip.caller, bad)
        with pytest.raises(NotFound):
            await ip.capsules.list_memories(ip.caller, "cap_\x00")
        with pytest.raises(InvalidArgument):
            await ip.uploads.begin(ip.caller, BeginRequest(
                capsule_id=ip.capsule_id, filename="photo\x00.jpg",
                content_type="image/jpeg", size=3, idempotency_key="k"))
        with pytest.raises(InvalidArgument):
            await ip.capsules.create_capsule(ip.caller, "fam\x00")
        with pytest.raises(InvalidArgument):
            await ip.capsules.new_memory(ip.caller, ip.capsule_id, meta={"x": float("nan")})
        with pytest.raises(InvalidArgument):
            await ip.capsules.new_memory(ip.caller, ip.capsule_id, meta={"x": "a\x00"})
        with pytest.raises(InvalidArgument):
            await ip.auth.create_principal("bob\x00")
        assert await ip.uploads.list_sessions(ip.caller) == []
        page = await ip.capsules.list_memories(ip.caller, ip.capsule_id)
        assert page.items == []
        # What they can carry round-trips on both.
        meta = {"caption": "a\nb\tc", "emoji": "\U0001f600", "deep": nested(30)}
        memory = await ip.capsules.new_memory(ip.caller, ip.capsule_id, title="Été",
                                              meta=meta)
        assert json.loads(json.dumps(memory.meta)) == meta
        assert (await ip.capsules.get_memory(ip.caller, memory.id)).meta == meta
