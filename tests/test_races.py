"""Concurrent requests that race in the metadata store have one defined outcome.

On SQLite one writer thread runs transactions one after another, so these races cannot
happen there; on PostgreSQL (READ COMMITTED, a pool of connections) they do: every request
below runs on its own connection, interleaved statement by statement. Each test states the
outcome the API promises: one session per idempotency key, limits that hold exactly, a
duplicate chunk that is a success, a name taken once — and never an ``internal`` error.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Awaitable
from random import Random
from typing import Any

import pytest
import sqlalchemy as sa

from memvault.errors import Conflict, MemvaultError, NotFound, ResourceExhausted, Unavailable
from memvault.metadata.schema import blobs, memories
from memvault.sessions import ChunkChecksums, FinishItem
from memvault.sessions.streaming import ChunkDigests
from tests.inprocess import CHUNK, InProcess, inprocess, pieces

ROUNDS = 5


async def _outcomes(calls: list[Awaitable[Any]]) -> list[Any]:
    """Results and typed errors; anything else (an IntegrityError, a 500) fails the test."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, MemvaultError):
            raise result
    return results


async def _memory_count(ip: InProcess) -> int:
    query = sa.select(sa.func.count()).select_from(memories)
    return int(await ip.db.query(lambda conn: conn.execute(query).scalar_one()))


async def _refcount(ip: InProcess, sha: str) -> int:
    query = sa.select(blobs.c.refcount).where(blobs.c.sha256 == sha)
    return int(await ip.db.query(lambda conn: conn.execute(query).scalar_one()))


async def test_one_idempotency_key_begun_at_once_makes_one_session(
    database_url: str | None,
) -> None:
    async with inprocess(database_url=database_url) as ip:
        for round_ in range(ROUNDS):
            request = ip.begin_request(3 * CHUNK, f"same-{round_}")
            results = await _outcomes([ip.uploads.begin(ip.caller, request) for _ in range(8)])
            assert {session.id for session, _ in results} == {results[0][0].id}
            assert sum(created for _, created in results) == 1
        assert await _memory_count(ip) == ROUNDS  # no memory made by a begin that lost


async def test_the_pending_session_cap_holds_under_concurrent_begins(
    database_url: str | None,
) -> None:
    async with inprocess(database_url=database_url, max_pending_per_capsule=3) as ip:
        results = await _outcomes([
            ip.uploads.begin(ip.caller, ip.begin_request(CHUNK, f"k{i}")) for i in range(10)
        ])
        made = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, ResourceExhausted)]
        assert (len(made), len(refused)) == (3, 7)
        assert await _memory_count(ip) == 3


async def test_the_daily_quota_holds_under_concurrent_begins(database_url: str | None) -> None:
    async with inprocess(database_url=database_url, daily_upload_quota=3 * CHUNK) as ip:
        results = await _outcomes([
            ip.uploads.begin(ip.caller, ip.begin_request(CHUNK, f"q{i}")) for i in range(8)
        ])
        made = [r for r in results if not isinstance(r, BaseException)]
        assert len(made) == 3
        assert all(isinstance(r, ResourceExhausted) for r in results if r not in made)


async def test_one_role_of_one_memory_is_begun_once(database_url: str | None) -> None:
    async with inprocess(database_url=database_url) as ip:
        memory = await ip.capsules.new_memory(ip.caller, ip.capsule_id)
        results = await _outcomes([
            ip.uploads.begin(ip.caller, ip.begin_request(
                CHUNK, f"d{i}", memory_id=memory.id, role="display"))
            for i in range(6)
        ])
        made = [r for r in results if not isinstance(r, BaseException)]
        assert len(made) == 1
        assert all(isinstance(r, Conflict) for r in results if r not in made)


async def test_the_same_chunk_sent_at_once_is_stored_once(database_url: str | None) -> None:
    data = os.urandom(2 * CHUNK)
    async with inprocess(database_url=database_url) as ip:
        for round_ in range(ROUNDS):
            session, _ = await ip.uploads.begin(ip.caller,
                                                ip.begin_request(len(data), f"c{round_}"))
            results = await _outcomes([
                ip.uploads.put_chunk(ip.caller, session.id, 0, CHUNK,
                                     pieces(data[:CHUNK], Random(i)), ChunkChecksums())
                for i in range(4)
            ])
            # One stores it; the others compare and succeed as duplicates, or are told to
            # send again if the one holding the range had not finished yet.
            stored = [r for r in results if not isinstance(r, BaseException)]
            assert [r.duplicate for r in stored].count(False) == 1
            assert all(isinstance(r, Unavailable) for r in results if r not in stored)
            parts = await ip.part_rows()
            assert [(p["offset"], p["state"]) for p in parts
                    if p["session_id"] == session.id] == [(0, "received")]
            await ip.uploads.put_chunk(ip.caller, session.id, 1, CHUNK,
                                       pieces(data[CHUNK:], Random(9)), ChunkChecksums())
            await ip.uploads.finish(ip.caller, session.id, len(data),
                                    hashlib.sha256(data).hexdigest())


async def _second_chunk_finished_and_read(ip: InProcess, session_id: str,
                                          data: bytes) -> bytes:
    """Send the second of two chunks, finish, and read back what was committed."""
    await ip.uploads.put_chunk(ip.caller, session_id, 1, CHUNK,
                               pieces(data[CHUNK:], Random(2)), ChunkChecksums())
    _, memory = await ip.uploads.finish(ip.caller, session_id, len(data),
                                        hashlib.sha256(data).hexdigest())
    return await ip.read_asset(memory.assets["original"].storage_key, len(data))


async def test_a_writer_whose_body_stands_still_loses_its_chunk_to_a_retry(
    database_url: str | None,
) -> None:
    """A chunk's body stops arriving (the client's network went quiet, its connection
    still open) for longer than the claim's lease. The same chunk sent again takes it over:
    the stalled writer, seeing its claim gone, is cut short and lets go of the range's lock,
    and only then does the taker write. The taker's bytes are the ones counted, hashed and
    committed; the stalled one is told it lost the chunk (503). (Found by review: the stalled
    writer renewed its claim for minutes, and every retry waited.)"""
    data = os.urandom(2 * CHUNK)
    first, second = data[:CHUNK], os.urandom(CHUNK)  # what the stalled writer and the taker send
    async with inprocess(database_url=database_url, claim_lease=2.0) as ip:
        session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), "late"))
        half, go_on = asyncio.Event(), asyncio.Event()

        async def stalling() -> AsyncIterator[bytes]:
            yield first[:CHUNK // 2]
            half.set()
            await go_on.wait()
            yield first[CHUNK // 2:]

        late = asyncio.create_task(ip.uploads.put_chunk(
            ip.caller, session.id, 0, CHUNK, stalling(), ChunkChecksums()))
        await half.wait()  # it holds the claim and the range's lock, and stands still
        ip.clock.advance(ip.settings.claim_lease + 1)
        taken = await ip.uploads.put_chunk(ip.caller, session.id, 0, CHUNK,
                                           pieces(second, Random(1)), ChunkChecksums())
        assert not taken.duplicate
        with pytest.raises(Unavailable, match="taken over"):
            await late
        go_on.set()
        whole = second + data[CHUNK:]
        assert await _second_chunk_finished_and_read(ip, session.id, whole) == whole


async def test_a_writer_stuck_in_a_write_keeps_the_range_from_a_taker(
    database_url: str | None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chunk's writer is stuck inside a write (a disk that stopped answering) for longer
    than its claim's lease, alive. A retry of the chunk must not write while that write
    runs, for the late bytes would land on the taker's after they were hashed (found by
    review: the blob no longer matched its name). The taker waits a lease for the range's
    lock, gives the claim back and is told to send again (503); once the write returns, the
    chunk sent again is written, and what is committed is exactly what was sent last."""
    data = os.urandom(2 * CHUNK)
    async with inprocess(database_url=database_url, claim_lease=1.0) as ip:
        session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), "stuck"))
        in_write, disk_back = threading.Event(), threading.Event()
        update = ChunkDigests.update

        def stuck_once(self: ChunkDigests, batch: Any) -> None:
            # Runs in the write's worker thread, right after the bytes went to the file.
            if not in_write.is_set():
                in_write.set()
                disk_back.wait(30)
            update(self, batch)

        monkeypatch.setattr(ChunkDigests, "update", stuck_once)
        late = asyncio.create_task(ip.uploads.put_chunk(
            ip.caller, session.id, 0, CHUNK, pieces(os.urandom(CHUNK), Random(0)),
            ChunkChecksums()))
        await asyncio.to_thread(in_write.wait, 30)
        ip.clock.advance(ip.settings.claim_lease + 1)
        with pytest.raises(Unavailable):
            await ip.uploads.put_chunk(ip.caller, session.id, 0, CHUNK,
                                       pieces(data[:CHUNK], Random(1)), ChunkChecksums())
        disk_back.set()
        with pytest.raises(Unavailable):
            await late  # its claim went and came back meanwhile; it was cut short anyway
        monkeypatch.undo()
        again = await ip.uploads.put_chunk(ip.caller, session.id, 0, CHUNK,
                                           pieces(data[:CHUNK], Random(2)), ChunkChecksums())
        assert not again.duplicate
        assert await _second_chunk_finished_and_read(ip, session.id, data) == data


async def test_a_writer_that_stood_still_before_its_lock_does_not_overwrite_a_taker(
    database_url: str | None,
) -> None:
    """A writer claims a chunk, then stands still before it takes the range's lock; another
    request takes the lapsed claim over, writes the chunk, marks it and lets go of the lock.
    When the first goes on and gets the lock, its claim is no longer its own: it writes
    nothing (503), and the committed bytes are the taker's. (Found by review: it overwrote
    the received, hashed bytes, and the blob no longer matched its name.)"""
    data = os.urandom(2 * CHUNK)
    # A short lease: the writer re-checks its claim after half of it, in real time.
    async with inprocess(database_url=database_url, claim_lease=0.4) as ip:
        session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), "gap"))
        store = ip.uploads.sessions.store
        open_writer = store.open_writer
        paused, go_on = asyncio.Event(), asyncio.Event()

        async def stands_still_first(*args: Any, **kwargs: Any) -> Any:
            if not paused.is_set():
                paused.set()
                await go_on.wait()
            return await open_writer(*args, **kwargs)

        store.open_writer = stands_still_first  # type: ignore[method-assign]
        try:
            late = asyncio.create_task(ip.uploads.put_chunk(
                ip.caller, session.id, 0, CHUNK, pieces(os.urandom(CHUNK), Random(0)),
                ChunkChecksums()))
            await paused.wait()
            ip.clock.advance(ip.settings.claim_lease + 1)
            taken = await ip.uploads.put_chunk(ip.caller, session.id, 0, CHUNK,
                                               pieces(data[:CHUNK], Random(1)),
                                               ChunkChecksums())
            assert not taken.duplicate
            await asyncio.sleep(ip.settings.claim_lease)  # it has stood still that long
            go_on.set()
            with pytest.raises(Unavailable):
                await late
        finally:
            store.open_writer = open_writer  # type: ignore[method-assign]
        assert await _second_chunk_finished_and_read(ip, session.id, data) == data


async def test_a_failed_claim_re_check_lets_go_of_the_range(
    database_url: str | None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The claim re-check after a long wait for the lock fails (the database went away, or
    the client left): the writer's descriptor, and with it the range's lock, is let go, so
    the chunk sent again is written. (Found by review: the lock stayed until a restart.)"""
    data = os.urandom(2 * CHUNK)
    async with inprocess(database_url=database_url, claim_lease=0.4) as ip:
        session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), "chk"))
        store = ip.uploads.sessions.store
        open_writer = store.open_writer
        receiver = ip.uploads.sessions._chunks

        async def slow_to_lock(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(ip.settings.claim_lease)
            return await open_writer(*args, **kwargs)

        async def database_gone(*args: Any) -> bool:
            raise ConnectionResetError("database went away")

        monkeypatch.setattr(store, "open_writer", slow_to_lock)
        monkeypatch.setattr(receiver, "_still_ours", database_gone)
        with pytest.raises(ConnectionResetError):
            await ip.uploads.put_chunk(ip.caller, session.id, 0, CHUNK,
                                       pieces(data[:CHUNK], Random(0)), ChunkChecksums())
        monkeypatch.undo()
        await ip.uploads.put_chunk(ip.caller, session.id, 0, CHUNK,
                                   pieces(data[:CHUNK], Random(1)), ChunkChecksums())
        assert await _second_chunk_finished_and_read(ip, session.id, data) == data


async def test_the_same_bytes_finished_in_two_sessions_at_once_share_one_blob(
    database_url: str | None,
) -> None:
    async with inprocess(database_url=database_url) as ip:
        for round_ in range(ROUNDS):
            data = os.urandom(CHUNK + 1)
            sha = hashlib.sha256(data).hexdigest()
            sessions = []
            for copy in range(3):
                session, _ = await ip.uploads.begin(
                    ip.caller, ip.begin_request(len(data), f"b{round_}-{copy}"))
                for index in range(session.chunk_count):
                    offset, length = session.chunk_range(index)
                    await ip.uploads.put_chunk(ip.caller, session.id, index, length,
                                               pieces(data[offset:offset + length], Random(0)),
                                               ChunkChecksums())
                sessions.append(session)
            await _outcomes([ip.uploads.finish(ip.caller, s.id, len(data), sha)
                             for s in sessions])
            assert await _refcount(ip, sha) == 3


async def test_one_capsule_name_is_taken_once(database_url: str | None) -> None:
    async with inprocess(database_url=database_url) as ip:
        results = await _outcomes([ip.capsules.create_capsule(ip.caller, "trip")
                                   for _ in range(6)])
        made = [r for r in results if not isinstance(r, BaseException)]
        assert len(made) == 1
        assert all(isinstance(r, Conflict) for r in results if r not in made)


async def _three_sent(ip: InProcess, key: str) -> tuple[str, list[tuple[Any, bytes]]]:
    """An original and two derivatives of one memory, every chunk received, none finished."""
    sessions: list[tuple[Any, bytes]] = []
    memory_id = ""
    for role in ("original", "display", "thumb"):
        data = os.urandom(CHUNK + 7)
        extra = {"role": role} | ({"memory_id": memory_id} if memory_id else {})
        session, _ = await ip.uploads.begin(
            ip.caller, ip.begin_request(len(data), f"{key}-{role}", **extra))
        memory_id = session.attrs["memory_id"]
        for index in range(session.chunk_count):
            offset, length = session.chunk_range(index)
            await ip.uploads.put_chunk(ip.caller, session.id, index, length,
                                       pieces(data[offset:offset + length], Random(0)),
                                       ChunkChecksums())
        sessions.append((session, data))
    return memory_id, sessions


def _items(sessions: list[tuple[Any, bytes]]) -> list[FinishItem]:
    return [FinishItem(s.id, len(d), hashlib.sha256(d).hexdigest()) for s, d in sessions]


async def _all_or_nothing(ip: InProcess, memory_id: str, sessions: list[tuple[Any, bytes]],
                          finish: Any, victim: str) -> None:
    states = [(await ip.session_row(s.id) or {}).get("state") for s, _ in sessions]
    memory = await ip.capsules.get_memory(ip.caller, memory_id)
    if isinstance(finish, BaseException):
        assert memory.assets == {}, memory.assets
        assert [st for (s, _), st in zip(sessions, states, strict=True)
                if s.id != victim] == ["pending", "pending"]
    else:
        assert set(memory.assets) == {"original", "display", "thumb"}
        assert states == ["committed"] * 3


async def test_a_joint_finish_racing_an_abort_commits_all_or_nothing(
    database_url: str | None,
) -> None:
    """One of three sessions finished together is aborted at the same moment: either the
    abort loses (all three are committed) or the finish fails (none is)."""
    async with inprocess(database_url=database_url) as ip:
        for round_ in range(ROUNDS):
            memory_id, sessions = await _three_sent(ip, f"j{round_}")
            victim = sessions[1 + round_ % 2][0].id
            finish, _ = await _outcomes([ip.uploads.finish_many(ip.caller, _items(sessions)),
                                         ip.uploads.abort(ip.caller, victim)])
            await _all_or_nothing(ip, memory_id, sessions, finish, victim)


async def test_an_abort_that_loses_to_a_finish_says_the_session_is_committed(
    database_url: str | None,
) -> None:
    """The abort reads the session pending, then a finish (on another server, say) commits
    it before the abort's own transaction: the abort answers ``conflict`` with state
    ``committed``. It answered 204, telling a user who cancelled "aborted" while the file
    was stored (a chaos review forced the order with a row lock on PostgreSQL)."""
    async with inprocess(database_url=database_url) as ip:
        data = os.urandom(1000)
        session_id = await ip.sent(data, "abort-loses")
        service = ip.uploads.sessions
        check_live = service._check_live

        async def finished_meanwhile(session: Any) -> Any:
            service._check_live = check_live  # type: ignore[method-assign]  # (finish's own)
            live = await check_live(session)
            await ip.uploads.finish(ip.caller, session_id, len(data),
                                    hashlib.sha256(data).hexdigest())
            return live

        service._check_live = finished_meanwhile  # type: ignore[method-assign]
        try:
            with pytest.raises(Conflict) as lost:
                await ip.uploads.abort(ip.caller, session_id)
        finally:
            service._check_live = check_live  # type: ignore[method-assign]
        assert lost.value.extra["state"] == "committed"
        status, _, _ = await ip.uploads.status(ip.caller, session_id)
        assert status.state == "committed"


async def test_an_abort_between_placing_and_committing_rolls_the_joint_finish_back(
    database_url: str | None,
) -> None:
    """The abort lands after every blob of a joint finish is in place and before its one
    transaction: the transaction finds the session ended, rolls back, and nothing of the
    three is committed; the finish answers with the victim's ``expired``."""
    async with inprocess(database_url=database_url) as ip:
        memory_id, sessions = await _three_sent(ip, "placed")
        victim = sessions[1][0]
        store = ip.uploads.sessions.store
        commit = store.commit
        placed = 0

        async def place_then_abort(key: str, sha256: str, size: int) -> str:
            nonlocal placed
            stored = await commit(key, sha256, size)
            placed += 1
            if placed == len(sessions):  # the last one in place: abort before the commit
                await ip.uploads.abort(ip.caller, victim.id)
            return stored

        store.commit = place_then_abort  # type: ignore[method-assign]
        finish = (await _outcomes([ip.uploads.finish_many(ip.caller, _items(sessions))]))[0]
        store.commit = commit  # type: ignore[method-assign]
        assert isinstance(finish, MemvaultError), finish
        assert finish.code in ("expired", "not_found"), finish
        assert finish.extra["upload_id"] == victim.id, finish.extra
        await _all_or_nothing(ip, memory_id, sessions, finish, victim.id)
        # The two left pending finish on their own afterwards (their blobs already in place).
        rest = [(s, d) for s, d in sessions if s.id != victim.id]
        done = await ip.uploads.finish_many(ip.caller, _items(rest))
        assert [s.state for s, _ in done] == ["committed", "committed"]


async def test_joint_finishes_over_the_same_sessions_in_opposite_orders_both_answer(
    database_url: str | None,
) -> None:
    """Two joint finishes name the same sessions in opposite orders: row locks are taken in
    one order whatever the request's, so on PostgreSQL neither deadlocks (a 500); one commits
    and the other replays the same commit."""
    async with inprocess(database_url=database_url) as ip:
        for round_ in range(ROUNDS):
            memory_id, sessions = await _three_sent(ip, f"o{round_}")
            items = _items(sessions)
            forward, backward = await _outcomes([ip.uploads.finish_many(ip.caller, items),
                                                 ip.uploads.finish_many(ip.caller, items[::-1])])
            assert not isinstance(forward, BaseException), forward
            assert not isinstance(backward, BaseException), backward
            assert [s.id for s, _ in forward] == [s.id for s, _ in backward][::-1]
            memory = await ip.capsules.get_memory(ip.caller, memory_id)
            assert set(memory.assets) == {"original", "display", "thumb"}


async def test_joint_finishes_of_crossed_contents_share_blobs_without_deadlock(
    database_url: str | None,
) -> None:
    """{A: x, B: y} and {C: y, D: x} finished at once lock the same two blob rows; in one
    order for both, so both commit and each blob is counted twice."""
    async with inprocess(database_url=database_url) as ip:
        for round_ in range(ROUNDS):
            x, y = os.urandom(CHUNK + 3), os.urandom(CHUNK + 5)
            sent = []
            for name, data in (("a", x), ("b", y), ("c", y), ("d", x)):
                session, _ = await ip.uploads.begin(
                    ip.caller, ip.begin_request(len(data), f"x{round_}-{name}"))
                for index in range(session.chunk_count):
                    offset, length = session.chunk_range(index)
                    await ip.uploads.put_chunk(
                        ip.caller, session.id, index, length,
                        pieces(data[offset:offset + length], Random(index)), ChunkChecksums())
                sent.append((session, data))
            first, second = await _outcomes([ip.uploads.finish_many(ip.caller, _items(sent[:2])),
                                             ip.uploads.finish_many(ip.caller, _items(sent[2:]))])
            assert not isinstance(first, BaseException), first
            assert not isinstance(second, BaseException), second
            for data in (x, y):
                assert await _refcount(ip, hashlib.sha256(data).hexdigest()) == 2


async def _read_until_done(ip: InProcess, memory_id: str, task: asyncio.Future[None]) -> list[Any]:
    """Reads of the memory back to back until ``task`` is done (so across its commit)."""
    seen = []
    while not task.done():
        seen += await _outcomes([ip.capsules.get_memory(ip.caller, memory_id)])
    return seen


async def test_a_memory_read_while_its_upload_is_aborted_is_there_or_not_found(
    database_url: str | None,
) -> None:
    """A read runs in one snapshot: the abort that removes a begun memory commits before or
    after it, never between its statements (on PostgreSQL it once did: the memory's capsule
    was found, the memory was then gone, and the read answered 500)."""
    async with inprocess(database_url=database_url) as ip:
        for round_ in range(ROUNDS):
            session, _ = await ip.uploads.begin(
                ip.caller, ip.begin_request(CHUNK, f"read-{round_}"))
            memory_id = session.attrs["memory_id"]
            abort = asyncio.ensure_future(ip.uploads.abort(ip.caller, session.id))
            readers = await asyncio.gather(
                *(_read_until_done(ip, memory_id, abort) for _ in range(3)))
            await abort
            for outcome in (o for seen in readers for o in seen):
                assert isinstance(outcome, NotFound) or outcome.id == memory_id, outcome
