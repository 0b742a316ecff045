"""End to end over HTTP against a real server process: the predecessor's scenarios."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import random

from tests.conftest import LiveServer
from tests.helpers import Api

MiB = 1024 * 1024


def test_upload_then_read_back(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(20 * MiB + 123)
    done = api.upload(cap, data)
    assert done["asset"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert done["asset"]["size"] == len(data)
    r = api.read(done["memory_id"])
    assert r.status_code == 200
    assert r.content == data
    assert r.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'


def test_hundred_uploads_each_visible_the_instant_finish_returns(api: Api) -> None:
    cap = api.capsule()
    rng = random.Random(1)
    for n in range(100):
        data = rng.randbytes(rng.randrange(0, 3000)) + n.to_bytes(4, "big")
        done = api.upload(cap, data)
        memory = api.http.get(f"/v1/memories/{done['memory_id']}").json()
        assert memory["assets"]["original"]["sha256"] == hashlib.sha256(data).hexdigest()
        listed = api.http.get(f"/v1/capsules/{cap}/memories", params={"limit": 1}).json()
        assert listed["items"][0]["id"] == done["memory_id"]
        assert api.read(done["memory_id"]).content == data


def test_sparse_interleaving_of_two_sessions(api: Api, server: LiveServer) -> None:
    cap = api.capsule()
    size = 3 * 256 * 1024  # three chunks each at the test server's chunk size
    a, b = os.urandom(size), os.urandom(size)
    sa, sb = api.session(cap, size), api.session(cap, size)
    assert sa["chunk_count"] == 3
    for session, data, index in [(sa, a, 0), (sb, b, 0), (sa, a, 2), (sb, b, 2),
                                 (sa, a, 1), (sb, b, 1)]:
        r = api.put(session, index, data)
        assert r.status_code == 200, r.text
    for session, data in [(sa, a), (sb, b)]:
        r = api.finish(session, data)
        assert r.status_code == 200, r.text
        assert r.json()["asset"]["sha256"] == hashlib.sha256(data).hexdigest()
        assert api.read(r.json()["memory_id"]).content == data


def test_duplicate_chunk_same_bytes_ok_different_bytes_conflict(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(600 * 1024)
    s = api.session(cap, len(data))
    assert api.put(s, 0, data).json()["duplicate"] is False
    again = api.put(s, 0, data)
    assert again.status_code == 200
    assert again.json()["duplicate"] is True
    forged = bytearray(data)
    forged[5] ^= 0xFF
    r = api.put(s, 0, bytes(forged))
    assert r.status_code == 409
    assert r.json()["code"] == "conflict"
    for i in range(1, s["chunk_count"]):
        assert api.put(s, i, data).status_code == 200
    # The stored chunk was untouched by the conflicting attempt.
    done = api.finish(s, data)
    assert done.status_code == 200, done.text
    assert api.read(done.json()["memory_id"]).content == data


def test_partial_last_chunk_and_zero_byte_file(api: Api) -> None:
    cap = api.capsule()
    data = os.urandom(2 * 256 * 1024 + 17)
    s = api.session(cap, len(data))
    assert s["chunk_count"] == 3
    done = api.upload(cap, data)
    assert api.read(done["memory_id"]).content == data

    empty = api.session(cap, 0)
    assert empty["chunk_count"] == 0
    r = api.finish(empty, b"")
    assert r.status_code == 200, r.text
    assert r.json()["asset"]["sha256"] == hashlib.sha256(b"").hexdigest()
    got = api.read(r.json()["memory_id"])
    assert got.status_code == 200
    assert got.content == b""


def test_concurrent_out_of_order_chunks_one_session_and_eight_sessions(api: Api) -> None:
    cap = api.capsule()
    pool = concurrent.futures.ThreadPoolExecutor(16)
    # One session, 16 chunks in flight, shuffled.
    data = os.urandom(32 * 256 * 1024 + 999)
    s = api.session(cap, len(data))
    order = list(range(s["chunk_count"]))
    random.Random(7).shuffle(order)
    results = list(pool.map(lambda i: api.put(s, i, data).status_code, order))
    assert results == [200] * len(order)
    assert api.finish(s, data).status_code == 200

    # Eight sessions at once, their chunks interleaved across the pool.
    blobs = [os.urandom(6 * 256 * 1024 + i) for i in range(8)]
    sessions = [api.session(cap, len(b)) for b in blobs]
    jobs = [(s, i, b) for s, b in zip(sessions, blobs, strict=True)
            for i in range(s["chunk_count"])]
    random.Random(8).shuffle(jobs)
    assert set(pool.map(lambda j: api.put(*j).status_code, jobs)) == {200}
    for s, b in zip(sessions, blobs, strict=True):
        r = api.finish(s, b)
        assert r.status_code == 200, r.text
        assert api.read(r.json()["memory_id"]).content == b
    pool.shutdown()
