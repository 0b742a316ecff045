"""The hash frontier's in-process chaining: a chunk that is still streaming when the chunk
before it has hashed its last byte adopts that state and hashes on, and the frontier takes the
result without reading the chunk back — unless the state it continued differs from the one
stored (then it hashes the part itself). Driven in-process with bodies the test paces."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from random import Random
from typing import Any

import pytest

from memvault.hashing import new_sha256
from memvault.sessions import ChunkChecksums
from tests.inprocess import CHUNK, InProcess, inprocess, pieces

BATCH = 8 * 1024  # several storage writes per 64 KiB chunk


def spy_hashing(ip: InProcess) -> list[tuple[int, int]]:
    """Record (offset, length) of every read-back-and-hash of staged bytes."""
    calls: list[tuple[int, int]] = []
    real = ip.store.hash_staged  # type: ignore[attr-defined]

    async def hash_staged(key: str, offset: int, length: int, state: Any) -> None:
        calls.append((offset, length))
        await real(key, offset, length, state)

    ip.store.hash_staged = hash_staged  # type: ignore[attr-defined]
    return calls


async def paced(data: bytes, halfway: asyncio.Event, go: asyncio.Event) -> AsyncIterator[bytes]:
    """The first half at once (the chunk's claim is made before a byte is read); then
    ``halfway`` is set, and the second half follows ``go``."""
    half = len(data) // 2
    for start in range(0, half, 4096):
        yield data[start:min(start + 4096, half)]
    halfway.set()
    await go.wait()
    for start in range(half, len(data), 4096):
        yield data[start:start + 4096]


async def session_row(ip: InProcess, session_id: str) -> dict[str, Any]:
    row = await ip.session_row(session_id)
    assert row is not None
    return row


async def test_a_chunk_streaming_when_its_predecessor_is_hashed_adopts_and_is_not_read_back(
    database_url: str | None,
) -> None:
    async with inprocess(database_url=database_url, write_batch=BATCH) as ip:
        calls = spy_hashing(ip)
        data = os.urandom(3 * CHUNK - 5)
        sha = hashlib.sha256(data).hexdigest()
        s, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), "adopt"))
        halfway, go = asyncio.Event(), asyncio.Event()
        second = asyncio.create_task(ip.uploads.put_chunk(
            ip.caller, s.id, 1, CHUNK, paced(data[CHUNK:2 * CHUNK], halfway, go),
            ChunkChecksums()))
        await halfway.wait()  # chunk 1 claimed past the frontier, half of it sent
        await ip.uploads.put_chunk(ip.caller, s.id, 0, CHUNK, pieces(data[:CHUNK], Random(0)),
                                   ChunkChecksums())
        go.set()
        await second
        await ip.uploads.put_chunk(ip.caller, s.id, 2, len(data) - 2 * CHUNK,
                                   pieces(data[2 * CHUNK:], Random(2)), ChunkChecksums())
        await ip.uploads.sessions.join_hashing(s.id)
        # Chunk 1 read back only the half it had written when the state came, never whole.
        assert [c for c in calls if c[0] == CHUNK] == [(CHUNK, CHUNK // 2)]
        assert all(length < CHUNK for _, length in calls)
        row = await session_row(ip, s.id)
        assert row["hashed_offset"] == len(data)
        _, memory = await ip.uploads.finish(ip.caller, s.id, len(data), sha)
        assert memory.assets["original"].sha256 == sha


async def test_a_precomputed_state_from_another_prefix_is_not_used(
    database_url: str | None,
) -> None:
    async with inprocess(database_url=database_url, write_batch=BATCH) as ip:
        calls = spy_hashing(ip)
        data = os.urandom(2 * CHUNK + 9)
        sha = hashlib.sha256(data).hexdigest()
        s, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), "stale"))
        await ip.uploads.put_chunk(ip.caller, s.id, 1, CHUNK,
                                   pieces(data[CHUNK:2 * CHUNK], Random(1)), ChunkChecksums())
        # What a chunk 1 that had adopted the state of *other* bytes at its start would leave.
        other = new_sha256()
        other.update(os.urandom(CHUNK))
        wrong = other.copy()
        wrong.update(data[CHUNK:2 * CHUNK])
        ip.uploads.sessions.hash_frontier.precomputed(s.id, CHUNK, other.to_bytes(),
                                                      2 * CHUNK, wrong)
        await ip.uploads.put_chunk(ip.caller, s.id, 0, CHUNK, pieces(data[:CHUNK], Random(0)),
                                   ChunkChecksums())
        await ip.uploads.put_chunk(ip.caller, s.id, 2, len(data) - 2 * CHUNK,
                                   pieces(data[2 * CHUNK:], Random(2)), ChunkChecksums())
        _, memory = await ip.uploads.finish(ip.caller, s.id, len(data), sha)
        assert memory.assets["original"].sha256 == sha
        assert (CHUNK, CHUNK) in calls  # hashed from staging, the stale result ignored


async def test_a_chunk_is_answered_only_when_the_hashing_behind_it_is_within_the_lag(
    database_url: str | None,
) -> None:
    """Chunks arriving faster than the background hashing would leave it all to the finish
    (370 ms for 4 GiB at 8 in flight, growing with the file). So a chunk's answer waits while
    the advancer is hashing and more than ``hash_lag`` behind the chunk's end; it never waits
    for a chunk that has not come: once the advancer stops at a gap, the answer goes."""
    async with inprocess(database_url=database_url, write_batch=BATCH, hash_lag=CHUNK) as ip:
        gate, hashing = asyncio.Event(), asyncio.Event()
        real = ip.store.hash_staged  # type: ignore[attr-defined]

        async def gated(key: str, offset: int, length: int, state: Any) -> None:
            hashing.set()
            await gate.wait()
            await real(key, offset, length, state)

        ip.store.hash_staged = gated  # type: ignore[attr-defined]
        data = os.urandom(5 * CHUNK)
        sha = hashlib.sha256(data).hexdigest()
        s, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), "lag"))

        def put(index: int) -> Any:
            part = data[index * CHUNK:(index + 1) * CHUNK]
            return ip.uploads.put_chunk(ip.caller, s.id, index, CHUNK,
                                        pieces(part, Random(index)), ChunkChecksums())

        async def received(index: int) -> None:
            for _ in range(1000):
                if any(p["offset"] == index * CHUNK for p in await ip.part_rows("received")):
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"chunk {index} never marked received")

        # Past the frontier, nothing hashable before it: answered at once.
        await asyncio.wait_for(put(1), 10)
        # Hashed as it streamed: answered at once; the advancer starts on chunk 1, held.
        await asyncio.wait_for(put(0), 10)
        await asyncio.wait_for(hashing.wait(), 10)
        third = asyncio.create_task(put(2))  # ends 2 chunks past the advancer: must wait
        fifth = asyncio.create_task(put(4))  # past the gap at chunk 3
        await received(2)
        await received(4)
        await asyncio.sleep(0.2)
        assert not third.done()
        assert not fifth.done()
        # A client gone while its answer waits loses nothing: the chunk stays received, and
        # sent again it is a duplicate, answered without waiting.
        third.cancel()
        with pytest.raises(asyncio.CancelledError):
            await third
        again = await asyncio.wait_for(put(2), 10)
        assert again.duplicate
        gate.set()
        # Answered, though chunk 3 was never sent: the advancer stops at the gap.
        await asyncio.wait_for(fifth, 10)
        assert (await session_row(ip, s.id))["hashed_offset"] == 3 * CHUNK
        await put(3)
        _, memory = await ip.uploads.finish(ip.caller, s.id, len(data), sha)
        assert memory.assets["original"].sha256 == sha
