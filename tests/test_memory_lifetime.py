"""A memory that an upload's begin created lives only while an upload holds or fills it.

Begin without ``memory_id`` creates the memory; derivative sessions (``memory_id`` given) may
then target it, as ``upload_memory``'s lane B does. Whichever of those sessions ends last
unfinished (abort, expiry) takes the memory with it when no asset was committed into it. A
memory made with ``POST .../memories``, or one that holds any asset, stays.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from random import Random

import pytest
import sqlalchemy as sa

from memvault.errors import Conflict, NotFound
from memvault.metadata.migrate import upgrade
from memvault.metadata.schema import memories, upload_sessions
from memvault.sessions import ChunkChecksums
from tests.inprocess import CHUNK, InProcess, inprocess, pieces


async def _memory_ids(ip: InProcess) -> set[str]:
    rows = await ip.db.query(lambda conn: conn.execute(sa.select(memories.c.id)).all())
    return {str(r) for (r,) in rows}


async def _end(ip: InProcess, session_id: str, how: str) -> None:
    if how == "abort":
        await ip.uploads.abort(ip.caller, session_id)
    else:
        assert await ip.uploads.sessions.expire(session_id)


async def _begin_pair(ip: InProcess) -> tuple[str, str, str]:
    """An original's session that creates a memory, and a thumb's session into that memory."""
    original, _ = await ip.uploads.begin(ip.caller, ip.begin_request(3 * CHUNK, "orig"))
    memory_id = original.attrs["memory_id"]
    thumb, _ = await ip.uploads.begin(
        ip.caller, ip.begin_request(100, "thumb", memory_id=memory_id, role="thumb"))
    return memory_id, original.id, thumb.id


async def _put_first_chunk(ip: InProcess, session_id: str) -> None:
    session, _, _ = await ip.uploads.status(ip.caller, session_id)
    _, length = session.chunk_range(0)
    await ip.uploads.put_chunk(ip.caller, session_id, 0, length,
                               pieces(os.urandom(length), Random(0)), ChunkChecksums())


async def _upload(ip: InProcess, session_id: str, data: bytes) -> None:
    session, _, _ = await ip.uploads.status(ip.caller, session_id)
    for index in range(session.chunk_count):
        offset, length = session.chunk_range(index)
        await ip.uploads.put_chunk(ip.caller, session_id, index, length,
                                   pieces(data[offset:offset + length], Random(index)),
                                   ChunkChecksums())
    await ip.uploads.finish(ip.caller, session_id, len(data), hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("first", ["original", "thumb"])
@pytest.mark.parametrize("how", ["abort", "expire", "abort then expire", "expire then abort"])
async def test_the_last_session_to_end_takes_the_empty_memory_with_it(
    first: str, how: str, database_url: str | None,
) -> None:
    async with inprocess(database_url=database_url) as ip:
        memory_id, original, thumb = await _begin_pair(ip)
        order = [original, thumb] if first == "original" else [thumb, original]
        ways = how.split(" then ") if " then " in how else [how, how]
        ttl = ip.settings.session_ttl
        if ways[0] == "expire":
            ip.clock.advance(ttl - 1)
            if ways[1] == "abort":  # a chunk keeps the other one alive past the first's TTL
                await _put_first_chunk(ip, order[1])
            ip.clock.advance(2)

        await _end(ip, order[0], ways[0])
        # The other session still holds the memory: it is there to be filled.
        assert (await ip.capsules.get_memory(ip.caller, memory_id)).id == memory_id

        if ways == ["abort", "expire"]:
            ip.clock.advance(ttl + 1)
        await _end(ip, order[1], ways[1])
        with pytest.raises(NotFound):
            await ip.capsules.get_memory(ip.caller, memory_id)
        assert await _memory_ids(ip) == set()


async def test_a_memory_with_a_committed_derivative_stays_when_its_original_is_aborted(
    database_url: str | None,
) -> None:
    async with inprocess(database_url=database_url) as ip:
        memory_id, original, thumb = await _begin_pair(ip)
        await _upload(ip, thumb, os.urandom(100))
        await ip.uploads.abort(ip.caller, original)
        memory = await ip.capsules.get_memory(ip.caller, memory_id)
        assert set(memory.assets) == {"thumb"}


async def test_a_memory_made_by_the_api_stays_when_its_uploads_end(
    database_url: str | None,
) -> None:
    async with inprocess(database_url=database_url) as ip:
        made = await ip.capsules.new_memory(ip.caller, ip.capsule_id, title="kept")
        session, _ = await ip.uploads.begin(
            ip.caller, ip.begin_request(100, "into-made", memory_id=made.id))
        await ip.uploads.abort(ip.caller, session.id)
        assert (await ip.capsules.get_memory(ip.caller, made.id)).title == "kept"


async def test_an_original_into_a_memory_whose_first_original_is_pending_is_a_conflict(
    database_url: str | None,
) -> None:
    async with inprocess(database_url=database_url) as ip:
        memory_id, original, _thumb = await _begin_pair(ip)
        with pytest.raises(Conflict):
            await ip.uploads.begin(
                ip.caller, ip.begin_request(3 * CHUNK, "second-original", memory_id=memory_id))
        # Once the first original's session has ended, the role is free again.
        await ip.uploads.abort(ip.caller, original)
        again, created = await ip.uploads.begin(
            ip.caller, ip.begin_request(3 * CHUNK, "second-original", memory_id=memory_id))
        assert created
        data = os.urandom(3 * CHUNK)
        await _upload(ip, again.id, data)
        memory = await ip.capsules.get_memory(ip.caller, memory_id)
        assert memory.assets["original"].sha256 == hashlib.sha256(data).hexdigest()


async def test_ends_and_begins_racing_on_one_memory_never_leave_it_empty_or_orphan_a_session(
    database_url: str | None,
) -> None:
    """On PostgreSQL each call runs on its own connection: two sessions ending at once must
    not each see the other still pending (and both keep the memory), and a derivative begun
    while the last holder ends either finds the memory gone or keeps it."""
    async with inprocess(database_url=database_url) as ip:
        for round_ in range(10):
            original, _ = await ip.uploads.begin(
                ip.caller, ip.begin_request(3 * CHUNK, f"orig-{round_}"))
            memory_id = original.attrs["memory_id"]
            thumb, _ = await ip.uploads.begin(ip.caller, ip.begin_request(
                100, f"thumb-{round_}", memory_id=memory_id, role="thumb"))
            late = ip.uploads.begin(ip.caller, ip.begin_request(
                50, f"place-{round_}", memory_id=memory_id, role="placeholder"))
            results = await asyncio.gather(
                ip.uploads.abort(ip.caller, original.id),
                ip.uploads.abort(ip.caller, thumb.id),
                late, return_exceptions=True)
            assert results[:2] == [None, None], results
            pending = await ip.uploads.list_sessions(ip.caller)
            if isinstance(results[2], BaseException):
                assert isinstance(results[2], NotFound), results[2]
                assert pending == []
                assert memory_id not in await _memory_ids(ip)
            else:
                # The placeholder's session holds the memory; ending it removes the memory.
                assert [s.id for s in pending] == [results[2][0].id]
                assert memory_id in await _memory_ids(ip)
                await ip.uploads.abort(ip.caller, results[2][0].id)
            assert await _memory_ids(ip) == set()


async def test_the_upgrade_names_the_beginning_session_of_a_memory_begun_before_it(
    database_url: str | None,
) -> None:
    """Revision 0005 adds ``memories.begun_by``; a pending session begun by the code before it
    said ``created_memory`` in its attributes, and the upgrade carries that over."""
    async with inprocess(database_url=database_url) as ip:
        memory_id, original, thumb = await _begin_pair(ip)
        row = await ip.session_row(original)
        assert row is not None
        old_attrs = {**row["attrs"], "created_memory": True}

        def as_revision_0004_left_it(conn: sa.Connection) -> None:
            conn.execute(sa.text("ALTER TABLE memories DROP COLUMN begun_by"))
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '0004'"))
            conn.execute(sa.update(upload_sessions).where(upload_sessions.c.id == original)
                         .values(attrs=old_attrs))

        await ip.db.transact(as_revision_0004_left_it)
        await upgrade(ip.settings.resolved_database_url)
        begun_by = sa.select(memories.c.begun_by).where(memories.c.id == memory_id)
        assert await ip.db.query(lambda conn: conn.execute(begun_by).scalar()) == original

        await ip.uploads.abort(ip.caller, original)
        await ip.uploads.abort(ip.caller, thumb)
        assert await _memory_ids(ip) == set()
