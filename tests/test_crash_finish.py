"""A crash inside finish leaves either a committed asset or a pending session, never a half.

finish does: verify → move the staged file into its content address → one transaction. The
process can die between any two steps; these tests stop it at each point (by running the steps
up to there, as the dead process would have) and show the next finish completes the upload.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from memvault.errors import Conflict, NotFound
from memvault.metadata.schema import assets, blobs, upload_parts
from memvault.sessions import ChunkChecksums
from tests.inprocess import CHUNK, InProcess, inprocess


async def _asset_rows(ip: InProcess) -> int:
    return len(await ip.db.query(lambda conn: conn.execute(sa.select(assets)).all()))


async def _refcount(ip: InProcess, sha: str) -> int:
    query = sa.select(blobs.c.refcount).where(blobs.c.sha256 == sha)
    return int(await ip.db.query(lambda conn: conn.execute(query).scalar_one()))


async def test_crash_after_blob_moved_before_transaction(database_url: str | None) -> None:
    data = os.urandom(3 * CHUNK + 5)
    sha = hashlib.sha256(data).hexdigest()
    async with inprocess(database_url=database_url) as ip:
        session_id = await ip.sent(data, "crash")
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
        assert await _refcount(ip, sha) == 1


async def test_crash_before_blob_moved(database_url: str | None) -> None:
    data = os.urandom(2 * CHUNK)
    sha = hashlib.sha256(data).hexdigest()
    async with inprocess(database_url=database_url) as ip:
        session_id = await ip.sent(data, "crash")
        # The dead process verified the digest and stopped: nothing changed on disk or in
        # the database, so a new finish simply does it all.
        assert await ip.uploads.sessions._frontier.digest(session_id, len(data)) == sha
        _, memory = await ip.uploads.finish(ip.caller, session_id, len(data), sha)
        assert await ip.read_asset(memory.assets["original"].storage_key, len(data)) == data


async def test_finish_repeated_after_commit_returns_the_same_asset(
    database_url: str | None,
) -> None:
    data = os.urandom(CHUNK + 1)
    sha = hashlib.sha256(data).hexdigest()
    async with inprocess(database_url=database_url) as ip:
        session_id = await ip.sent(data, "crash")
        first, memory = await ip.uploads.finish(ip.caller, session_id, len(data), sha)
        again, memory_again = await ip.uploads.finish(ip.caller, session_id, len(data), sha)
        assert again.id == first.id
        assert memory_again.assets == memory.assets
        assert await _asset_rows(ip) == 1
        with pytest.raises(NotFound):
            await ip.uploads.finish(ip.caller.__class__("prn_other", "eve", False), session_id,
                                    len(data), sha)


async def test_two_finishes_at_once_commit_once(database_url: str | None) -> None:
    async with inprocess(database_url=database_url) as ip:
        # Rounds, so the finishes interleave differently (rename against rename, parts
        # dropped under a late finish's coverage check): every finish answers the one commit.
        for round_ in range(8):
            data = os.urandom(3 * CHUNK)
            sha = hashlib.sha256(data).hexdigest()
            session_id = await ip.sent(data, f"race-{round_}")
            results = await asyncio.gather(
                *(ip.uploads.finish(ip.caller, session_id, len(data), sha) for _ in range(4))
            )
            assert {s.id for s, _ in results} == {session_id}
            assert {m.assets["original"].sha256 for _, m in results} == {sha}
            assert await _refcount(ip, sha) == 1
        assert await _asset_rows(ip) == 8


async def _held_body(data: bytes, started: asyncio.Event,
                     go: asyncio.Event) -> AsyncIterator[bytes]:
    """A body that sends its first byte, then waits for ``go`` before the rest."""
    yield data[:1]
    started.set()
    await go.wait()
    yield data[1:]


@pytest.mark.parametrize("ending", ["finish", "abort"])
async def test_a_chunk_that_outlives_its_session_is_told_why(
    database_url: str | None, ending: str,
) -> None:
    """A chunk still arriving when finish commits (a duplicate) answers ``conflict`` with
    the state; one racing an abort answers ``not_found``, as the aborted session does."""
    data = os.urandom(3 * CHUNK)
    async with inprocess(database_url=database_url) as ip:
        session_id = await ip.sent(data, "crash")
        if ending == "abort":  # the chunk in flight is a missing one, being written
            await ip.db.transact(lambda conn: conn.execute(
                sa.delete(upload_parts).where(upload_parts.c.session_id == session_id,
                                              upload_parts.c.offset == 0)))
        started, go = asyncio.Event(), asyncio.Event()
        late = asyncio.create_task(ip.uploads.put_chunk(
            ip.caller, session_id, 0, CHUNK, _held_body(data[:CHUNK], started, go),
            ChunkChecksums()))
        await started.wait()
        if ending == "finish":
            await ip.uploads.finish(ip.caller, session_id, len(data),
                                    hashlib.sha256(data).hexdigest())
        else:
            await ip.uploads.abort(ip.caller, session_id)
        go.set()
        if ending == "finish":
            with pytest.raises(Conflict) as raised:
                await late
            assert raised.value.extra["state"] == "committed"
        else:
            with pytest.raises(NotFound):
                await late
        assert await ip.part_rows() == []


async def test_staging_nobody_owns_is_swept_after_the_grace_period(
    database_url: str | None,
) -> None:
    async with inprocess(database_url=database_url) as ip:
        live, _ = await ip.uploads.begin(ip.caller, ip.begin_request(3 * CHUNK, "live"))
        for key in ("ses_orphan", "drv_leftover", "ses_fresh_orphan"):
            await ip.store.stage(key)
        old = time.time() - 7200
        for key in ("ses_orphan", "drv_leftover", live.staging_key):
            os.utime(ip.staging_dir / key, (old, old))
        assert await ip.uploads.sessions.sweep_staging(grace=3600) == 2
        assert ip.staged_files() == {live.staging_key, "ses_fresh_orphan"}
        assert await ip.uploads.sessions.sweep_staging(grace=3600) == 0
