"""Derivative jobs in-process on a manual clock: claim, lease, retry, fail, never twice.

The job row is made by finish's commit transaction; these tests drive the queue the way
workers do, including workers that die (their lease lapses) and workers that come back late
(their result is refused, so nothing a user can see happens twice).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from random import Random
from typing import Any

import pytest

from memvault.errors import Unavailable
from memvault.jobs.queue import FAILED, PENDING, UNSUPPORTED, JobQueue, StoredDerivative
from memvault.jobs.runner import DerivativeRunner
from memvault.sessions import ChunkChecksums, FinishItem
from tests.image_corpus import encode, quadrants
from tests.inprocess import CHUNK, InProcess, inprocess, pieces


async def _original(ip: InProcess, key: str, data: bytes | None = None) -> str:
    data = os.urandom(CHUNK + 7) if data is None else data
    session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), key))
    for index in range(session.chunk_count):
        offset, length = session.chunk_range(index)
        await ip.uploads.put_chunk(ip.caller, session.id, index, length,
                                   pieces(data[offset:offset + length], Random(index)),
                                   ChunkChecksums())
    _, memory = await ip.uploads.finish(ip.caller, session.id, len(data),
                                        hashlib.sha256(data).hexdigest())
    return memory.id


async def _all_made(ip: InProcess, memory_id: str) -> None:
    memory = await ip.capsules.get_memory(ip.caller, memory_id)
    assert set(memory.assets) == {"original", "display", "thumb", "placeholder"}
    assert memory.derivatives == dict.fromkeys(("display", "thumb", "placeholder"), "ready")


def _queue(ip: InProcess) -> JobQueue:
    return JobQueue(ip.db, ip.clock, lease=30, max_attempts=3, backoff=10)


async def _derivative(ip: InProcess, role: str, data: bytes) -> StoredDerivative:
    """Store bytes the way the runner does (content-addressed blob, no row yet)."""
    key = f"drv_{role}_{hashlib.sha256(data).hexdigest()[:8]}"
    key = await ip.store.stage(key)
    writer = await ip.store.open_writer(key, 0, length=len(data), part=0)
    await writer.write([data])
    receipt = await writer.close(durable=True)
    await ip.store.seal(key, len(data), [receipt])
    sha = hashlib.sha256(data).hexdigest()
    return StoredDerivative(role, sha, len(data), await ip.store.commit(key, sha, len(data)),
                            "image/webp")


async def test_finishing_an_original_enqueues_one_job_that_one_worker_claims(
    database_url: str | None,
) -> None:
    async with inprocess(database_url=database_url) as ip:
        memory_id = await _original(ip, "a")
        memory = await ip.capsules.get_memory(ip.caller, memory_id)
        assert memory.derivatives == dict.fromkeys(("display", "thumb", "placeholder"),
                                                   "pending")
        queue = _queue(ip)
        claims = await asyncio.gather(*(queue.claim(f"w{i}") for i in range(5)))
        won = [c for c in claims if c is not None]
        assert len(won) == 1, "two workers got the same job"
        job = won[0]
        assert (job.memory_id, job.attempts, job.missing) == (
            memory_id, 1, ("display", "thumb", "placeholder"))
        assert await queue.claim("w9") is None


async def test_a_dead_workers_job_is_taken_over_and_its_late_result_refused(
    database_url: str | None,
) -> None:
    async with inprocess(database_url=database_url) as ip:
        memory_id = await _original(ip, "b")
        queue = _queue(ip)
        first = await queue.claim("dies")
        assert first is not None
        ip.clock.advance(29)
        assert await queue.claim("other") is None  # the lease still holds
        ip.clock.advance(2)
        second = await queue.claim("other")
        assert second is not None
        assert second.attempts == 2
        made = [await _derivative(ip, role, role.encode() * 10)
                for role in ("display", "thumb", "placeholder")]
        assert not await queue.renew(first, "dies")
        assert not await queue.complete(first, "dies", made, "late")  # changes nothing
        assert (await ip.capsules.get_memory(ip.caller, memory_id)).assets.keys() == {
            "original"}
        assert await queue.complete(second, "other", made, "AAAA")
        memory = await ip.capsules.get_memory(ip.caller, memory_id)
        assert memory.assets.keys() == {"original", "display", "thumb", "placeholder"}
        assert memory.derivatives == dict.fromkeys(("display", "thumb", "placeholder"), "ready")
        assert memory.thumbhash == "AAAA"
        assert await queue.counts() == {"done": 1}


async def test_failures_back_off_then_fail_for_good_with_the_reason(
    database_url: str | None,
) -> None:
    async with inprocess(database_url=database_url) as ip:
        memory_id = await _original(ip, "c")
        queue = _queue(ip)
        job = await queue.claim("w")
        for attempt, wait in ((1, 10), (2, 20)):  # backoff doubles: 10 s, then 20 s
            assert job is not None
            assert job.attempts == attempt
            assert await queue.fail(job, "w", f"boom {attempt}") == PENDING
            ip.clock.advance(wait - 0.5)
            assert await queue.claim("w") is None
            ip.clock.advance(0.5)
            job = await queue.claim("w")
        assert job is not None
        assert job.attempts == 3
        assert await queue.fail(job, "w", "boom 3") == FAILED
        ip.clock.advance(10_000)
        assert await queue.claim("w") is None
        memory = await ip.capsules.get_memory(ip.caller, memory_id)
        assert memory.derivatives == dict.fromkeys(("display", "thumb", "placeholder"), "failed")
        assert memory.derivatives_reason == "boom 3"


async def test_unsupported_is_final_and_client_uploads_are_never_overwritten(
    database_url: str | None,
) -> None:
    async with inprocess(database_url=database_url) as ip:
        pdf = await _original(ip, "pdf")
        queue = _queue(ip)
        job = await queue.claim("w")
        assert job is not None
        assert await queue.finish(job, "w", UNSUPPORTED, "not_an_image: a PDF")
        memory = await ip.capsules.get_memory(ip.caller, pdf)
        assert set(memory.derivatives.values()) == {"unsupported"}
        assert memory.derivatives_reason == "not_an_image: a PDF"

        photo = await _original(ip, "photo")
        job = await queue.claim("w")
        assert job is not None
        assert job.memory_id == photo
        # The client's own display lands while the server works on the job.
        client_display = os.urandom(300)
        s, _ = await ip.uploads.begin(ip.caller, ip.begin_request(
            len(client_display), "display", memory_id=photo, role="display"))
        await ip.uploads.put_chunk(ip.caller, s.id, 0, len(client_display),
                                   pieces(client_display, Random(0)), ChunkChecksums())
        await ip.uploads.finish(ip.caller, s.id, len(client_display),
                                hashlib.sha256(client_display).hexdigest())
        await ip.capsules.update_memory(ip.caller, photo, {"thumbhash": "CLIENT"})
        made = [await _derivative(ip, role, role.encode() * 10)
                for role in ("display", "thumb", "placeholder")]
        assert await queue.complete(job, "w", made, "BBBB")
        memory = await ip.capsules.get_memory(ip.caller, photo)
        assert memory.assets["display"].sha256 == hashlib.sha256(client_display).hexdigest()
        assert memory.assets["thumb"].sha256 == hashlib.sha256(b"thumb" * 10).hexdigest()
        assert memory.thumbhash == "CLIENT"

        # Without a client ThumbHash, the server's is stored.
        other = await _original(ip, "other")
        job = await queue.claim("w")
        assert job is not None
        assert job.memory_id == other
        assert await queue.complete(job, "w", made, "BBBB")
        assert (await ip.capsules.get_memory(ip.caller, other)).thumbhash == "BBBB"


async def test_an_original_whose_derivatives_came_first_needs_no_job(
    database_url: str | None,
) -> None:
    async with inprocess(database_url=database_url) as ip:
        memory = await ip.capsules.new_memory(ip.caller, ip.capsule_id)
        for role in ("display", "thumb", "placeholder", "original"):
            data = os.urandom(100)
            s, _ = await ip.uploads.begin(ip.caller, ip.begin_request(
                len(data), role, memory_id=memory.id, role=role))
            await ip.uploads.put_chunk(ip.caller, s.id, 0, len(data), pieces(data, Random(0)),
                                       ChunkChecksums())
            await ip.uploads.finish(ip.caller, s.id, len(data),
                                    hashlib.sha256(data).hexdigest())
        assert await _queue(ip).claim("w") is None
        memory = await ip.capsules.get_memory(ip.caller, memory.id)
        assert set(memory.derivatives.values()) == {"ready"}


@pytest.mark.parametrize("role", ["display"])
async def test_a_memory_without_an_original_has_no_job(role: str, database_url: str | None) -> None:
    async with inprocess(database_url=database_url) as ip:
        memory = await ip.capsules.new_memory(ip.caller, ip.capsule_id)
        assert set(memory.derivatives.values()) == {"absent"}
        data = os.urandom(100)
        s, _ = await ip.uploads.begin(ip.caller, ip.begin_request(
            len(data), "d", memory_id=memory.id, role=role))
        await ip.uploads.put_chunk(ip.caller, s.id, 0, len(data), pieces(data, Random(0)),
                                   ChunkChecksums())
        await ip.uploads.finish(ip.caller, s.id, len(data), hashlib.sha256(data).hexdigest())
        assert await _queue(ip).claim("w") is None
        memory = await ip.capsules.get_memory(ip.caller, memory.id)
        assert memory.derivatives == {"display": "ready", "thumb": "absent",
                                      "placeholder": "absent"}


async def test_a_role_a_client_is_uploading_is_left_to_the_client(
    database_url: str | None,
) -> None:
    """The job must not take a role whose upload session is pending (the client's finish
    would then be refused): it stores the others and looks again later."""
    async with inprocess(database_url=database_url) as ip:
        photo = await _original(ip, "photo")
        queue = _queue(ip)
        job = await queue.claim("w")
        assert job is not None
        client_thumb = os.urandom(200)
        s, _ = await ip.uploads.begin(ip.caller, ip.begin_request(
            len(client_thumb), "thumb", memory_id=photo, role="thumb"))
        made = [await _derivative(ip, role, role.encode() * 10)
                for role in ("display", "thumb", "placeholder")]
        assert await queue.complete(job, "w", made, "BBBB")
        memory = await ip.capsules.get_memory(ip.caller, photo)
        assert set(memory.assets) == {"original", "display", "placeholder"}
        assert memory.derivatives["thumb"] == "pending"
        assert await queue.claim("w") is None  # deferred, not spinning

        await ip.uploads.put_chunk(ip.caller, s.id, 0, len(client_thumb),
                                   pieces(client_thumb, Random(0)), ChunkChecksums())
        await ip.uploads.finish(ip.caller, s.id, len(client_thumb),
                                hashlib.sha256(client_thumb).hexdigest())
        ip.clock.advance(11)
        again = await queue.claim("w")
        assert again is not None
        assert again.attempts == 1  # the deferral used no attempt
        assert again.missing == ()
        assert await queue.complete(again, "w", [], None)
        memory = await ip.capsules.get_memory(ip.caller, photo)
        assert memory.assets["thumb"].sha256 == hashlib.sha256(client_thumb).hexdigest()
        assert set(memory.derivatives.values()) == {"ready"}


async def test_a_claimed_job_knows_which_missing_roles_clients_are_sending(
    database_url: str | None,
) -> None:
    """The runner decodes only if some missing role has no client upload on its way (the
    SDK's lane B finishes its derivatives after the original): ``coming`` tells it."""
    async with inprocess(database_url=database_url) as ip:
        photo = await _original(ip, "photo")
        sessions = {}
        for role in ("display", "thumb", "placeholder"):
            sessions[role], _ = await ip.uploads.begin(ip.caller, ip.begin_request(
                100, role, memory_id=photo, role=role))
        queue = _queue(ip)
        job = await queue.claim("w")
        assert job is not None
        assert set(job.missing) == job.coming == {"display", "thumb", "placeholder"}
        assert await queue.complete(job, "w", [], None)  # what the runner does: no decode
        assert await queue.claim("w") is None  # deferred while they are pending
        await ip.uploads.abort(ip.caller, sessions["thumb"].id)
        ip.clock.advance(11)
        again = await queue.claim("w")
        assert again is not None
        assert again.attempts == 1  # the deferral used no attempt
        assert set(again.missing) - again.coming == {"thumb"}  # abandoned: the job makes it


async def test_a_role_whose_upload_ends_between_claim_and_complete_is_still_made(
    database_url: str | None,
) -> None:
    """The client aborts its thumb after the job was claimed (thumb ``coming``) and before
    the job completes without decoding: the job must not end done without a thumb."""
    async with inprocess(database_url=database_url) as ip:
        photo = await _original(ip, "photo", encode(quadrants((96, 64), (200, 10, 10)), "JPEG"))
        for role in ("display", "placeholder"):
            data = os.urandom(300)
            await _sent_and_finished(ip, data, role, photo)
        thumb, _ = await ip.uploads.begin(ip.caller, ip.begin_request(
            100, "thumb", memory_id=photo, role="thumb"))
        queue = _queue(ip)
        runner = DerivativeRunner(queue, ip.store, workers=1, timeout=60, memory_limit=0)
        try:
            job = await queue.claim(runner.worker_id)
            assert job is not None
            assert set(job.missing) == job.coming == {"thumb"}
            await ip.uploads.abort(ip.caller, thumb.id)
            await runner._derive(job)  # no decode: nothing missing that is not coming
            again = await queue.claim(runner.worker_id)  # at once, not after a backoff
            assert again is not None
            assert again.attempts == 1
            assert set(again.missing) - again.coming == {"thumb"}
            await runner._derive(again)
        finally:
            await runner.close()
        await _all_made(ip, photo)


async def _sent_and_finished(ip: InProcess, data: bytes, role: str, memory_id: str) -> None:
    session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(
        len(data), role, memory_id=memory_id, role=role))
    await ip.uploads.put_chunk(ip.caller, session.id, 0, len(data),
                               pieces(data, Random(0)), ChunkChecksums())
    await ip.uploads.finish(ip.caller, session.id, len(data), hashlib.sha256(data).hexdigest())


async def test_no_job_for_a_memory_whose_derivatives_commit_with_its_original(
    database_url: str | None,
) -> None:
    """A joint finish that lists the derivatives before the original (as the SDK does) adds
    their rows first, so the original's commit finds them all and queues nothing."""
    async with inprocess(database_url=database_url) as ip:
        items, memory_id = [], ""
        for role in ("original", "display", "thumb", "placeholder"):
            data = os.urandom(500)
            extra = {"role": role} | ({"memory_id": memory_id} if memory_id else {})
            session, _ = await ip.uploads.begin(
                ip.caller, ip.begin_request(len(data), f"nojob-{role}", **extra))
            memory_id = session.attrs["memory_id"]
            await ip.uploads.put_chunk(ip.caller, session.id, 0, len(data),
                                       pieces(data, Random(0)), ChunkChecksums())
            items.append(FinishItem(session.id, len(data), hashlib.sha256(data).hexdigest()))
        await ip.uploads.finish_many(ip.caller, items[1:] + items[:1])
        memory = await ip.capsules.get_memory(ip.caller, memory_id)
        assert memory.derivatives == dict.fromkeys(("display", "thumb", "placeholder"), "ready")
        assert await _queue(ip).claim("w") is None


async def _photo_and_runner(ip: InProcess, colour: tuple[int, int, int],
                            ) -> tuple[str, JobQueue, DerivativeRunner]:
    """A committed JPEG original (its job queued) and a runner with one decoder process;
    the caller closes the runner."""
    memory_id = await _original(ip, "photo", encode(quadrants((96, 64), colour), "JPEG"))
    queue = _queue(ip)
    return memory_id, queue, DerivativeRunner(queue, ip.store, workers=1, timeout=60,
                                              memory_limit=2 * 1024**3)


async def test_a_job_that_meets_a_passing_condition_runs_again_without_using_an_attempt(
    database_url: str | None,
) -> None:
    """The job's bytes cannot be placed this second (the same content is being collected:
    503 ``unavailable``): it runs again a moment later, and that attempt is not counted
    against ``max_attempts``."""
    async with inprocess(database_url=database_url) as ip:
        memory_id, queue, runner = await _photo_and_runner(ip, (200, 30, 30))
        reserve = runner.placements.reserve
        busy: list[int] = []

        async def collected_right_now(*args: Any, **kwargs: Any) -> None:
            busy.append(1)
            raise Unavailable("the same content is being removed", retry_after=1)

        try:
            job = await queue.claim(runner.worker_id)
            assert job is not None
            runner.placements.reserve = collected_right_now  # type: ignore[method-assign]
            await runner._process(job)
            assert busy == [1]
            assert await queue.claim("other") is None, "run again at once"
            ip.clock.advance(10)  # Retry-After (1 s), but no sooner than the backoff
            runner.placements.reserve = reserve  # type: ignore[method-assign]
            job = await queue.claim(runner.worker_id)
            assert job is not None
            assert job.attempts == 1, "the postponed run used up an attempt"
            await runner._process(job)
        finally:
            await runner.close()
        await _all_made(ip, memory_id)


async def test_a_store_that_stays_unavailable_uses_up_the_attempts(
    database_url: str | None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Any other 503 (an S3 store refusing, which may last) is a failure like the rest: it
    backs off, uses an attempt, and after the last one the job ends ``failed``."""
    async with inprocess(database_url=database_url) as ip:
        memory_id, queue, runner = await _photo_and_runner(ip, (30, 200, 30))

        async def refusing(*args: Any, **kwargs: Any) -> str:
            raise Unavailable("the bucket refuses", retry_after=5)

        monkeypatch.setattr(ip.store, "stage", refusing)
        try:
            for wait in (10, 20, 0):
                job = await queue.claim(runner.worker_id)
                assert job is not None
                await runner._process(job)
                ip.clock.advance(wait)
        finally:
            await runner.close()
        memory = await ip.capsules.get_memory(ip.caller, memory_id)
        assert memory.derivatives == dict.fromkeys(("display", "thumb", "placeholder"), "failed")
        assert "the bucket refuses" in (memory.derivatives_reason or "")


async def test_an_original_damaged_on_disk_is_not_derived(database_url: str | None) -> None:
    """The original's blob was cut short behind the server's back: the job fails saying so,
    rather than making derivatives of what is left (a truncated JPEG still decodes, with
    grey where the rest was), which would then look like the memory's."""
    async with inprocess(database_url=database_url) as ip:
        memory_id, queue, runner = await _photo_and_runner(ip, (30, 30, 200))
        memory = await ip.capsules.get_memory(ip.caller, memory_id)
        original = memory.assets["original"]
        os.truncate(ip.root / original.storage_key, original.size // 2)
        try:
            for _ in range(3):
                job = await queue.claim(runner.worker_id)
                assert job is not None
                await runner._process(job)
                ip.clock.advance(3600)
        finally:
            await runner.close()
        memory = await ip.capsules.get_memory(ip.caller, memory_id)
        assert memory.derivatives == dict.fromkeys(("display", "thumb", "placeholder"), "failed")
        assert f"{original.size // 2} bytes on disk, {original.size} expected" in (
            memory.derivatives_reason or "")
        assert set(memory.assets) == {"original"}
