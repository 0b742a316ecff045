"""Several server processes on one PostgreSQL database: one truth, no sticky sessions.

Two real ``memvault serve`` processes share a PostgreSQL database and (standing in for a
shared object store) one blob folder. A client talks to either at random; races between them
— the same chunk, the same finish, the reapers, the derivative workers — each have one
outcome, read back from the API and counted in both processes' logs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import SMALL_CHUNKS, LiveServer
from tests.helpers import Api
from tests.s3server import S3Server

PART = 5 * 1024 * 1024  # S3's smallest part

Pair = tuple[LiveServer, LiveServer]


@dataclass
class Cluster:
    servers: Pair
    a: Api
    b: Api


StartCluster = Callable[..., Cluster]


@pytest.fixture
def cluster(tmp_path: Path, postgres_url: str) -> Iterator[StartCluster]:
    """``cluster(**env)``: two servers on one fresh PostgreSQL database and one blob folder,
    with a client for each; all stopped when the test ends."""
    started: list[Cluster] = []

    def start(**env: str) -> Cluster:
        common = {**SMALL_CHUNKS, "MEMVAULT_DATABASE_URL": postgres_url, **env}
        data = tmp_path / "data"
        data.mkdir()
        subprocess.run(
            [sys.executable, "-m", "memvault", "db", "upgrade", "--data", str(data)],
            env={**os.environ, **common}, check=True, capture_output=True, timeout=120,
        )
        first = LiveServer(data, env=common)
        first.start()  # makes the admin principal and its token file
        second = LiveServer(data, env=common)
        second.start()
        started.append(Cluster((first, second), first.api(), second.api()))
        return started[-1]

    yield start
    for c in started:
        c.a.http.close()
        c.b.http.close()
        for server in c.servers:
            server.kill()


def events(servers: Sequence[LiveServer], name: str) -> list[dict[str, Any]]:
    """Log events called ``name`` from both servers."""
    found = []
    for server in servers:
        assert server.log_path is not None
        for line in server.log_path.read_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
    return found


def both(calls: list[Callable[[], Any]]) -> list[Any]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def race_one_upload(a: Api, b: Api, capsule: str) -> None:
    data = os.urandom(9 * 64 * 1024 + 11)
    session = a.session(capsule, len(data))
    # Chunks alternate between the servers, two in flight at a time.
    indices = list(range(session["chunk_count"]))
    for start in range(0, len(indices), 2):
        batch = indices[start:start + 2]
        results = both([lambda i=i: (a if i % 2 else b).put(session, i, data) for i in batch])
        assert [r.status_code for r in results] == [200] * len(batch)
    # The same chunk to both at once: stored once, both told so (or one asked to resend).
    dup = both([lambda: a.put(session, 0, data), lambda: b.put(session, 0, data)])
    assert sorted(r.status_code for r in dup) in ([200, 200], [200, 503])
    finished = both([lambda: a.finish(session, data), lambda: b.finish(session, data)])
    assert [r.status_code for r in finished] == [200, 200], [r.text for r in finished]
    # One commit, told to both (the memory beside it may have moved on between the reads).
    assert [{**r.json(), "memory": None} for r in finished] == [
        {**finished[0].json(), "memory": None}] * 2
    memory_id = finished[0].json()["memory_id"]
    for api in (a, b):
        read = api.read(memory_id)
        assert hashlib.sha256(read.content).hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_session_is_driven_through_both_servers_and_finished_by_both_at_once(
    cluster: StartCluster,
) -> None:
    c = cluster()
    a, b = c.a, c.b
    capsule = a.capsule()
    for _ in range(5):
        race_one_upload(a, b, capsule)
    listed = b.http.get(f"/v1/capsules/{capsule}/memories").json()["items"]
    assert len(listed) == 5
    assert all(set(m["assets"]) == {"original"} for m in listed)


def s3_cluster(cluster: StartCluster, s3_server: S3Server, **env: str) -> Cluster:
    return cluster(**s3_server.env(s3_server.new_bucket(), "handoff"),
                   MEMVAULT_CHUNK_SIZE=str(PART),
                   # moto dates multipart uploads in 2010: no sweep under a live session.
                   MEMVAULT_REAPER_INTERVAL="3600", **env)


def put_backwards(c: Cluster, session: dict[str, Any], data: bytes) -> None:
    """Every chunk past the hash frontier when it arrives, odd ones on b and even ones on a,
    the last first: neither server can hash a byte until chunk 0 lands."""
    for index in reversed(range(session["chunk_count"])):
        r = (c.b if index % 2 else c.a).put(session, index, data)
        assert r.status_code == 200, r.text


def test_on_s3_each_server_hashes_the_parts_it_holds_so_finish_reads_nothing_back(
    cluster: StartCluster, s3_server: S3Server,
) -> None:
    c = s3_cluster(cluster, s3_server)
    capsule = c.a.capsule()
    for size in (5 * PART + 99, 4 * PART):
        data = os.urandom(size)
        session = c.a.session(capsule, len(data))
        put_backwards(c, session, data)
        done = c.a.finish(session, data)
        assert done.status_code == 200, done.text
        assert done.json()["asset"]["sha256"] == hashlib.sha256(data).hexdigest()
        assert c.b.read(done.json()["memory_id"]).content == data
    # Without the hand-off, a's finish would read b's parts back from the object store.
    assert events(c.servers, "session.read_back") == []


def test_on_s3_a_part_whose_holder_died_is_read_back_after_the_handoff_wait(
    cluster: StartCluster, s3_server: S3Server,
) -> None:
    c = s3_cluster(cluster, s3_server, MEMVAULT_FRONTIER_HANDOFF_WAIT="0.5")
    capsule = c.a.capsule()
    data = os.urandom(3 * PART + 1)
    session = c.a.session(capsule, len(data))
    assert c.b.put(session, 1, data).status_code == 200  # kept only in b's spool
    c.servers[1].kill()  # SIGKILL: b's part is in the bucket, its spool copy gone with b
    for index in (3, 2, 0):
        assert c.a.put(session, index, data).status_code == 200
    done = c.a.finish(session, data)
    assert done.status_code == 200, done.text
    assert done.json()["asset"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert c.a.read(done.json()["memory_id"]).content == data
    read_back = events(c.servers[:1], "session.read_back")
    assert [(e["offset"], e["length"]) for e in read_back] == [(PART, len(data) - PART)]


def test_the_idempotent_begin_and_the_pending_cap_hold_across_servers(
    cluster: StartCluster,
) -> None:
    c = cluster(MEMVAULT_MAX_PENDING_PER_CAPSULE="4")
    a, b = c.a, c.b
    capsule = a.capsule()
    same = both([lambda api=api: api.begin(capsule, 1000, idempotency_key="one")
                 for api in (a, b, a, b)])
    assert sorted(r.status_code for r in same) == [200, 200, 200, 201]
    assert len({r.json()["id"] for r in same}) == 1
    many = both([lambda api=api, i=i: api.begin(capsule, 1000, idempotency_key=f"k{i}")
                 for i, api in enumerate((a, b) * 4)])
    codes = sorted(r.status_code for r in many)
    assert codes == [201] * 3 + [429] * 5, codes  # 4 pending at most, "one" included


def test_reapers_on_both_servers_expire_each_session_once(cluster: StartCluster) -> None:
    c = cluster(MEMVAULT_SESSION_TTL="1", MEMVAULT_REAPER_INTERVAL="0.2")
    a, servers = c.a, c.servers
    capsule = a.capsule()
    ids = [a.session(capsule, 1000)["id"] for _ in range(12)]
    deadline = time.monotonic() + 60
    while len(events(servers, "session.expire")) < len(ids):
        assert time.monotonic() < deadline, "sessions not expired in time"
        time.sleep(0.2)
    time.sleep(1)  # several more reaper passes on both servers
    expired = [e["session_id"] for e in events(servers, "session.expire")]
    assert sorted(expired) == sorted(ids)  # each once, none twice
    assert a.http.get(f"/v1/uploads/{ids[0]}").json()["code"] == "expired"


def _jpeg(seed: int) -> bytes:
    image = Image.new("RGB", (640, 480), (seed * 20 % 256, 90, 160))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def test_derivative_workers_on_both_servers_run_each_job_once(cluster: StartCluster) -> None:
    c = cluster(MEMVAULT_DERIVATIVE_WORKERS="1")
    a, b, servers = c.a, c.b, c.servers
    capsule = a.capsule()
    memory_ids = []
    for seed in range(8):
        data = _jpeg(seed)
        api = a if seed % 2 else b
        done = api.upload(capsule, data, content_type="image/jpeg")
        memory_ids.append(done["memory_id"])
    deadline = time.monotonic() + 120
    for memory_id in memory_ids:
        while True:
            memory = a.http.get(f"/v1/memories/{memory_id}").json()
            if set(memory["derivatives"].values()) == {"ready"}:
                break
            assert "failed" not in memory["derivatives"].values(), memory
            assert time.monotonic() < deadline, memory
            time.sleep(0.1)
    done_events = events(servers, "jobs.done")
    assert sorted(e["memory_id"] for e in done_events) == sorted(memory_ids)


def test_a_server_refuses_an_out_of_date_schema_and_says_what_to_run(
    tmp_path: Path, postgres_url: str,
) -> None:
    env = {**os.environ, "MEMVAULT_DATABASE_URL": postgres_url, "MEMVAULT_LOG_FORMAT": "json"}
    serve = [sys.executable, "-m", "memvault", "serve", "--data", str(tmp_path / "data"),
             "--port", "1"]  # never gets as far as listening
    refused = subprocess.run(serve, env=env, capture_output=True, text=True, timeout=120,
                             check=False)
    assert refused.returncode != 0
    assert "run `memvault db upgrade`" in refused.stdout + refused.stderr
    upgrade = subprocess.run(
        [sys.executable, "-m", "memvault", "db", "upgrade", "--data", str(tmp_path / "data")],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert upgrade.returncode == 0, upgrade.stderr
    assert "schema is current" in upgrade.stdout
    server = LiveServer(tmp_path / "data", env={"MEMVAULT_DATABASE_URL": postgres_url})
    server.start()
    try:
        assert httpx.get(f"{server.url}/readyz").status_code == 200
    finally:
        server.kill()
