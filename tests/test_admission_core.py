"""Admission and expiry in-process, on a manual clock: what the predecessor got wrong.

* Stale sessions blocked a caller until something evicted sessions by *caller*, live ones
  included (seeds 000, 001). Here only sessions past their TTL make room, one by id.
* A concurrency manager swallowed its exception and leaked slots (seed 002). Here slots are
  taken in one synchronous step and given back in ``finally``; a property test ends
  transfers in every way at random and finds the counters back at zero.
* Quotas reserve at begin, release on abort/expiry, turn into usage at finish, and finish
  checks them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from random import Random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memvault import errors
from memvault.admission import TransferSlots
from memvault.sessions import ChunkChecksums
from tests.inprocess import CHUNK, InProcess, inprocess, pieces


async def _upload(ip: InProcess, data: bytes, key: str) -> str:
    session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), key))
    rng = Random(key)
    for index in range(session.chunk_count):
        offset, length = session.chunk_range(index)
        await ip.uploads.put_chunk(ip.caller, session.id, index, length,
                                   pieces(data[offset:offset + length], rng), ChunkChecksums())
    return session.id


async def _hanging(first: bytes, reached: asyncio.Event) -> AsyncIterator[bytes]:
    yield first
    reached.set()
    await asyncio.Event().wait()


async def test_stale_sessions_make_room_after_their_ttl_and_live_ones_stay(
    database_url: str | None,
) -> None:
    # claim_lease is long on the manual clock because a writer renews its claim every
    # lease/3 of *real* time; jumping the clock by the TTL must not make it look dead.
    async with inprocess(database_url=database_url, max_pending_per_capsule=10, session_ttl=100,
                         claim_lease=10_000) as ip:
        sessions = [
            (await ip.uploads.begin(ip.caller, ip.begin_request(2 * CHUNK, f"k{i}")))[0]
            for i in range(10)
        ]
        with pytest.raises(errors.ResourceExhausted) as refused:
            await ip.uploads.begin(ip.caller, ip.begin_request(10, "k10"))
        assert (refused.value.extra["active"], refused.value.extra["limit"]) == (10, 10)
        assert refused.value.retry_after == 100

        active, streaming, stale = sessions[0], sessions[1], sessions[2:]
        reached = asyncio.Event()
        put = asyncio.create_task(ip.uploads.put_chunk(
            ip.caller, streaming.id, 0, CHUNK, _hanging(b"x" * 100, reached), ChunkChecksums()))
        await reached.wait()
        ip.clock.advance(60)
        data = os.urandom(CHUNK)
        await ip.uploads.put_chunk(ip.caller, active.id, 0, CHUNK, pieces(data, Random(1)),
                                   ChunkChecksums())
        ip.clock.advance(41)  # stale and streaming are past their TTL; active is not

        session, created = await ip.uploads.begin(ip.caller, ip.begin_request(10, "k10"))
        assert created
        for s in stale:
            with pytest.raises(errors.Expired):
                await ip.uploads.status(ip.caller, s.id)
        assert (await ip.uploads.status(ip.caller, active.id))[1] == [0]
        assert (await ip.uploads.status(ip.caller, streaming.id))[0].state == "pending"
        assert not put.done(), "the transfer under way was disturbed"
        # Listed while its chunk streams; past its TTL once the transfer ends, it is expired
        # by the listing itself, as a GET of it would (not listed until a reaper came).
        assert {s.id for s in await ip.uploads.list_sessions(ip.caller)} == {
            active.id, streaming.id, session.id}
        put.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await put
        assert {s.id for s in await ip.uploads.list_sessions(ip.caller)} == {
            active.id, session.id}
        with pytest.raises(errors.Expired):
            await ip.uploads.status(ip.caller, streaming.id)


async def test_the_live_list_leaves_out_sessions_past_their_ttl_before_any_reaper(
    database_url: str | None,
) -> None:
    """``GET /v1/uploads`` is the caller's live sessions: one past its TTL is gone from it at
    once, not only once a reaper (every 60 s by default) or a request for it expires it."""
    async with inprocess(database_url=database_url) as ip:
        old, _ = await ip.uploads.begin(ip.caller, ip.begin_request(10, "old"))
        ip.clock.advance(60)
        young, _ = await ip.uploads.begin(ip.caller, ip.begin_request(10, "young"))
        assert [s.id for s in await ip.uploads.list_sessions(ip.caller)] == [old.id, young.id]
        ip.clock.advance(41)  # old is past its 100 s TTL, young is not
        assert [s.id for s in await ip.uploads.list_sessions(ip.caller)] == [young.id]
        assert [s.id for s in await ip.uploads.sessions.list_pending(None)] == [young.id]
        with pytest.raises(errors.Expired):
            await ip.uploads.status(ip.caller, old.id)


async def test_finish_checks_the_storage_quota_again_and_stays_resumable(
    database_url: str | None,
) -> None:
    async with inprocess(database_url=database_url, storage_quota=4 * CHUNK) as ip:
        data = os.urandom(3 * CHUNK)
        session_id = await _upload(ip, data, "big")
        sha = hashlib.sha256(data).hexdigest()
        ip.uploads.settings = ip.settings.model_copy(update={"storage_quota": 2 * CHUNK})
        with pytest.raises(errors.InsufficientStorage) as over:
            await ip.uploads.finish(ip.caller, session_id, len(data), sha)
        assert over.value.extra["limit_name"] == "storage_quota"
        assert over.value.extra["reserved"] == 0  # its own reservation is not counted twice
        assert (await ip.uploads.status(ip.caller, session_id))[0].state == "pending"
        ip.uploads.settings = ip.settings
        _, memory = await ip.uploads.finish(ip.caller, session_id, len(data), sha)
        assert memory.assets["original"].sha256 == sha


async def test_daily_quota_resets_at_midnight_utc(database_url: str | None) -> None:
    async with inprocess(database_url=database_url, daily_upload_quota=3 * CHUNK) as ip:
        data = os.urandom(2 * CHUNK)
        session_id = await _upload(ip, data, "today")
        await ip.uploads.finish(ip.caller, session_id, len(data), hashlib.sha256(data).hexdigest())
        with pytest.raises(errors.ResourceExhausted) as over:
            await ip.uploads.begin(ip.caller, ip.begin_request(2 * CHUNK, "more"))
        now = ip.clock.now()
        midnight = now - now % 86400 + 86400
        assert over.value.retry_after == pytest.approx(midnight - now)
        ip.clock.advance(midnight - now)
        _, created = await ip.uploads.begin(ip.caller, ip.begin_request(2 * CHUNK, "more"))
        assert created


ENDINGS = st.sampled_from(["return", "error", "cancel", "timeout"])


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(st.tuples(st.integers(0, 3), ENDINGS, st.integers(0, 3)), max_size=40),
    total=st.integers(1, 6), per=st.integers(1, 4),
)
def test_slots_return_to_the_maximum_after_any_sequence(
    ops: list[tuple[int, str, int]], total: int, per: int,
) -> None:
    """Transfers start while others run and end every way a request can end; refusals are
    typed and change nothing; when all have ended every slot is free again."""
    slots = TransferSlots(total, per)

    async def transfer(principal: str, ending: str, delay: int) -> str:
        with slots.hold(principal):
            assert slots.in_use <= total
            assert slots.held_by(principal) <= per
            await asyncio.sleep(delay / 1000)
            if ending == "error":
                raise errors.ChecksumMismatch("bad bytes")
            if ending == "timeout":
                async with asyncio.timeout(0):
                    await asyncio.sleep(1)
            if ending == "cancel":
                await asyncio.sleep(10)  # cancelled from outside
        return "done"

    async def scenario() -> None:
        tasks = []
        for principal, ending, delay in ops:
            tasks.append((ending, asyncio.create_task(transfer(f"p{principal}", ending, delay))))
            await asyncio.sleep(0)  # let it take (or be refused) its slot now
        await asyncio.sleep(0.005)
        for ending, task in tasks:
            if ending == "cancel":
                task.cancel()
        results = await asyncio.gather(*(t for _, t in tasks), return_exceptions=True)
        for (ending, _), result in zip(tasks, results, strict=True):
            assert result == "done" or isinstance(
                result, (errors.ResourceExhausted, errors.ChecksumMismatch, TimeoutError,
                         asyncio.CancelledError)), (ending, result)
        assert slots.in_use == 0
        assert all(slots.held_by(f"p{i}") == 0 for i in range(4))

    asyncio.run(scenario())


def test_refusals_name_the_limit_that_was_hit() -> None:
    slots = TransferSlots(total=2, per_principal=1)
    with slots.hold("a"):
        with pytest.raises(errors.ResourceExhausted) as mine, slots.hold("a"):
            pass  # pragma: no cover
        assert mine.value.extra["limit_name"] == "transfer_slots_per_principal"
        with slots.hold("b"):
            with pytest.raises(errors.ResourceExhausted) as full, slots.hold("c"):
                pass  # pragma: no cover
            assert full.value.extra["limit_name"] == "transfer_slots"
            assert full.value.retry_after == 1
        assert slots.in_use == 1
    assert slots.in_use == 0
