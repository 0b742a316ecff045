"""A bounded load test: 200 chunk streams at once from 20 principals against a live server.

Bounded in count (200 chunks of 256 KiB, 50 MiB in all) and time (30 s). It passes when the
only errors anyone saw were typed 429s (transfer slots; clients wait ``Retry-After`` and
send again), every upload finished with the right digest and reads back byte for byte, and
``/metrics`` shows no slot and no reservation left behind.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from memvault.auth import AuthService
from memvault.clock import SystemClock
from memvault.metadata import Database
from tests.conftest import SMALL_CHUNKS, LiveServer
from tests.helpers import metric

PRINCIPALS = 20
FILES_EACH = 2
CHUNKS_EACH = 5
CHUNK = 256 * 1024
DEADLINE = 30.0


@pytest.fixture
def busy_server(tmp_path: Path) -> Iterator[LiveServer]:
    # Fewer slots than streams, so admission control is exercised, not just present.
    env = {**SMALL_CHUNKS, "MEMVAULT_TRANSFER_SLOTS": "48",
           "MEMVAULT_TRANSFER_SLOTS_PER_PRINCIPAL": "6"}
    server = LiveServer(tmp_path / "data", env=env)
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def _principal(server: LiveServer, token: str, seen: collections.Counter[str],
                     rng: random.Random) -> list[tuple[str, bytes]]:
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=FILES_EACH * CHUNKS_EACH)
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60,
                                 limits=limits) as http:
        capsule = (await http.post("/v1/capsules", json={"name": "load"})).json()["id"]
        files = [os.urandom(CHUNKS_EACH * CHUNK - rng.randrange(CHUNK)) for _ in range(FILES_EACH)]
        sessions = []
        for n, data in enumerate(files):
            r = await http.post("/v1/uploads", json={
                "capsule_id": capsule, "filename": f"f{n}", "content_type": "image/jpeg",
                "size": len(data), "idempotency_key": f"load-{n}"})
            assert r.status_code == 201, r.text
            sessions.append(r.json())

        async def put(session: dict[str, str], data: bytes, index: int) -> None:
            body = data[index * CHUNK:(index + 1) * CHUNK]
            while True:
                r = await http.put(f"/v1/uploads/{session['id']}/chunks/{index}", content=body)
                if r.status_code == 200:
                    return
                seen[f"{r.status_code} {r.json().get('code')}"] += 1
                assert r.status_code == 429, r.text
                await asyncio.sleep(float(r.headers["Retry-After"]) * rng.uniform(0.2, 1.0))

        await asyncio.gather(*(put(s, data, i) for s, data in zip(sessions, files, strict=True)
                               for i in range(CHUNKS_EACH)))
        finished = []
        for s, data in zip(sessions, files, strict=True):
            sha = hashlib.sha256(data).hexdigest()
            r = await http.post(f"/v1/uploads/{s['id']}/finish",
                                json={"size": len(data), "sha256": sha})
            assert r.status_code == 200, r.text
            assert r.json()["asset"]["sha256"] == sha
            got = await http.get(f"/v1/memories/{s['memory_id']}/assets/original")
            assert got.content == data
            finished.append((s["id"], data))
        return finished


async def _tokens(server: LiveServer, count: int) -> list[str]:
    """Principals made straight in the server's database (the CLI would start a process for
    each; the server reads them from the same SQLite file)."""
    db = Database.open(f"sqlite:///{server.data_dir / 'memvault.db'}")
    try:
        auth = AuthService(db, SystemClock())
        return [(await auth.create_principal(f"load{i}"))[1] for i in range(count)]
    finally:
        await db.dispose()


def test_200_concurrent_chunk_streams_from_20_principals(busy_server: LiveServer) -> None:
    tokens = asyncio.run(_tokens(busy_server, PRINCIPALS))
    seen: collections.Counter[str] = collections.Counter()

    async def everyone() -> list[list[tuple[str, bytes]]]:
        async with asyncio.timeout(DEADLINE):
            return await asyncio.gather(*(
                _principal(busy_server, token, seen, random.Random(i))
                for i, token in enumerate(tokens)
            ))

    results = asyncio.run(everyone())
    assert sum(len(r) for r in results) == PRINCIPALS * FILES_EACH
    assert set(seen) <= {"429 resource_exhausted"}, seen
    assert seen["429 resource_exhausted"] > 0, "the limits were never reached"
    assert metric(busy_server, "memvault_transfer_slots_in_use") == 0
    assert metric(busy_server, "memvault_reserved_bytes") == 0
    assert metric(busy_server, "memvault_sessions", state="pending") == 0
    assert metric(busy_server, "memvault_sessions", state="committed") == PRINCIPALS * FILES_EACH
    errors = metric(busy_server, "memvault_errors_total", code="resource_exhausted")
    assert errors == seen["429 resource_exhausted"]
