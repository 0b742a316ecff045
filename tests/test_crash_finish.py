"""A crash inside finish leaves either a committed asset or a pending session, never a half.

finish does: verify → move the staged file into its content address → one transaction. The
process can die between any two steps; these tests stop it at each point (by running the steps
up to there, as the dead process would have) and show the next finish completes the upload.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from random import Random

import pytest
import sqlalchemy as sa

from memvault.errors import NotFound
from memvault.metadata.schema import assets, blobs
from memvault.sessions import ChunkChecksums
from tests.inprocess import CHUNK, InProcess, inprocess, pieces


async def _received_session(ip: InProcess, data: bytes) -> str:
    session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), "crash"))
    rng = Random(3)
    for index in range(session.chunk_count):
        offset, length = session.chunk_range(index)
        await ip.uploads.put_chunk(ip.caller, session.id, index, length,
                                   pieces(data[offset:offset + length], rng), ChunkChecksums())
    return session.id


async def _asset_rows(ip: InProcess) -> int:
    async with ip.db.read() as conn:
        return len((await conn.execute(sa.select(assets))).all())


async def test_crash_after_blob_moved_before_transaction() -> None:
    data = os.urandom(3 * CHUNK + 5)
    sha = hashlib.sha256(data).hexdigest()
    async with inprocess() as ip:
        session_id = await _received_session(ip, data)
        session = await ip.uploads.sessions.get(session_id, ip.caller.id)
        # The dead process got as far as moving the bytes into place:
        await ip.store.commit(session.staging_key, sha, len(data))
        assert ip.staged_files() == set()
        # ... and no further: the session is pending and nothing is visible yet.
        status, received, _ = await ip.uploads.status(ip.caller, session_id)
        assert status.state == "pending"
        assert received == [0, 1, 2, 3]
        assert await _asset_rows(ip) == 0

        committed, memory = await ip.uploads.finish(ip.caller, session_id, len(data), sha)
        assert committed.state == "committed"
        asset = memory.assets["original"]
        assert asset.sha256 == sha
        assert await ip.read_asset(asset.storage_key, len(data)) == data
        async with ip.db.read() as conn:
            (refcount,) = (await conn.execute(
                sa.select(blobs.c.refcount).where(blobs.c.sha256 == sha))).one()
        assert refcount == 1


async def test_crash_before_blob_moved() -> None:
    data = os.urandom(2 * CHUNK)
    sha = hashlib.sha256(data).hexdigest()
    async with inprocess() as ip:
        session_id = await _received_session(ip, data)
        # The dead process verified the digest and stopped: nothing changed on disk or in
        # the database, so a new finish simply does it all.
        assert await ip.uploads.sessions._frontier.digest(session_id, len(data)) == sha
        _, memory = await ip.uploads.finish(ip.caller, session_id, len(data), sha)
        assert await ip.read_asset(memory.assets["original"].storage_key, len(data)) == data


async def test_finish_repeated_after_commit_returns_the_same_asset() -> None:
    data = os.urandom(CHUNK + 1)
    sha = hashlib.sha256(data).hexdigest()
    async with inprocess() as ip:
        session_id = await _received_session(ip, data)
        first, memory = await ip.uploads.finish(ip.caller, session_id, len(data), sha)
        again, memory_again = await ip.uploads.finish(ip.caller, session_id, len(data), sha)
        assert again.id == first.id
        assert memory_again.assets == memory.assets
        assert await _asset_rows(ip) == 1
        with pytest.raises(NotFound):
            await ip.uploads.finish(ip.caller.__class__("prn_other", "eve", False), session_id,
                                    len(data), sha)


async def test_two_finishes_at_once_commit_once() -> None:
    data = os.urandom(3 * CHUNK)
    sha = hashlib.sha256(data).hexdigest()
    async with inprocess() as ip:
        session_id = await _received_session(ip, data)
        results = await asyncio.gather(
            *(ip.uploads.finish(ip.caller, session_id, len(data), sha) for _ in range(4))
        )
        assert {s.id for s, _ in results} == {session_id}
        assert {m.assets["original"].sha256 for _, m in results} == {sha}
        assert await _asset_rows(ip) == 1
        async with ip.db.read() as conn:
            (refcount,) = (await conn.execute(
                sa.select(blobs.c.refcount).where(blobs.c.sha256 == sha))).one()
        assert refcount == 1
