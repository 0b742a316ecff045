"""The upload core under random interleavings of many sessions, checked against a model.

A hypothesis state machine drives several sessions at once through the in-process services
(no HTTP): begin and idempotent re-begin, good and bad chunks of every kind, concurrent
duplicate chunks, cancelled and broken request bodies, finish with and without gaps or the
right digest, abort, and a manual clock moved past (or just short of) the TTL with and without
the reaper. After every step the service's view (status, the pending list, the metadata rows,
the hash frontier, the staging files, the memories and blobs) must match the model exactly.

Expiry is modelled with two bounds per session: ``definite`` is the last time the session was
certainly in use (begun, or a new chunk received) and ``possible`` the last time any request
for it might have counted as use (a duplicate or failed chunk, a refused finish, a re-begin).
The service's ``last_seen`` must lie between them: a session idle for a whole TTL since
``possible`` must be expired, and one used within a TTL of ``definite`` must still be pending.
Reads (status, list) are not use.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from random import Random
from typing import Any, TypeVar

import crc32c
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from memvault import errors
from memvault.hashing import Sha256State
from memvault.metadata.schema import blobs, upload_parts, upload_sessions
from memvault.sessions import ChunkChecksums, PutResult
from tests.inprocess import CHUNK, InProcess, inprocess, pieces

T = TypeVar("T")

TTL = 100
GRACE = 300
MAX_SESSIONS = 10

PENDING, COMMITTED, ABORTED, EXPIRED, PURGED = (
    "pending", "committed", "aborted", "expired", "purged",
)

SIZES = st.one_of(
    st.just(0),
    st.integers(1, 5 * CHUNK),
    st.sampled_from([1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK - 1, 5 * CHUNK]),
)
PICK = st.integers(0, 1_000)
SEED = st.integers(0, 2**32 - 1)


class ClientGone(Exception):
    """A request body that breaks off mid-stream (the client went away)."""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Model:
    """What the service should know about one session."""

    id: str
    key: str
    memory_id: str
    data: bytes  # what the client means to upload
    definite: float
    possible: float
    stored: dict[int, bytes] = field(default_factory=dict)  # chunks the service accepted
    state: str = PENDING
    ended_at: float | None = None
    result_sha: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def count(self) -> int:
        return -(-self.size // CHUNK)

    def chunk(self, index: int) -> bytes:
        return self.data[index * CHUNK:(index + 1) * CHUNK]

    @property
    def missing(self) -> list[int]:
        return [i for i in range(self.count) if i not in self.stored]

    @property
    def actual(self) -> bytes:
        """The bytes the session holds (differ from ``data`` if a chunk was sent altered)."""
        assert not self.missing
        return b"".join(self.stored[i] for i in range(self.count))

    @property
    def received_bytes(self) -> int:
        return sum(len(b) for b in self.stored.values())

    @property
    def prefix(self) -> bytes:
        """The contiguous received prefix: what the hash frontier should cover."""
        out = []
        for i in range(self.count):
            if i not in self.stored:
                break
            out.append(self.stored[i])
        return b"".join(out)


async def _stalled(payload: bytes, reached: asyncio.Event) -> AsyncIterator[bytes]:
    """A body that sends half its bytes and then hangs (to be cancelled)."""
    yield payload[: len(payload) // 2]
    reached.set()
    await asyncio.Event().wait()


async def _broken(payload: bytes, cut: int) -> AsyncIterator[bytes]:
    yield payload[:cut]
    raise ClientGone


@settings(
    max_examples=int(os.environ.get("MEMVAULT_STATEFUL_EXAMPLES", "50")),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
class UploadMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.stack = contextlib.AsyncExitStack()
        try:
            self.env: InProcess = self.run(
                self.stack.enter_async_context(inprocess(expired_grace=GRACE))
            )
        except BaseException:
            self.runner.close()
            raise
        self.sessions: list[Model] = []
        self.keys = 0

    def teardown(self) -> None:
        try:
            self.run(self.stack.aclose())
        finally:
            self.runner.close()

    # -- plumbing --------------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def raises(self, exc: type[BaseException] | tuple[type[BaseException], ...],
               coro: Coroutine[Any, Any, Any]) -> Any:
        with pytest.raises(exc) as info:
            self.run(coro)
        return info.value

    @property
    def now(self) -> float:
        return self.env.clock.now()

    def pick(self, pick: int, *states: str) -> Model:
        candidates = [m for m in self.sessions if m.state in states]
        return candidates[pick % len(candidates)]

    def has(self, *states: str) -> bool:
        return any(m.state in states for m in self.sessions)

    def overdue(self, m: Model) -> bool:
        """Whether a pending session is past its TTL (so it must no longer be served)."""
        now = self.now
        if m.possible + TTL <= now:
            return True
        if m.definite + TTL > now:
            return False
        # In between the service may go either way; the invariant checks its last_seen lies
        # between the bounds, so whatever it recorded is a valid answer.
        row = self.run(self.env.session_row(m.id))
        assert row is not None
        return bool(row["expires_at"] <= now)

    def expired_now(self, m: Model) -> None:
        m.state, m.ended_at = EXPIRED, self.now

    def reclaim_overdue(self) -> None:
        """Every begin first expires the caller's sessions in the capsule that are past
        their TTL (and only those): model that before calling it."""
        for m in self.sessions:
            if m.state == PENDING and self.overdue(m):
                self.expired_now(m)

    async def _put(self, m: Model, index: int, content_length: int | None,
                   body: AsyncIterator[bytes], checksums: ChunkChecksums) -> PutResult:
        async with contextlib.aclosing(body):
            return await self.env.uploads.put_chunk(
                self.env.caller, m.id, index, content_length, body, checksums
            )

    async def _cancelled_put(self, m: Model, index: int, payload: bytes) -> None:
        reached = asyncio.Event()
        task = asyncio.ensure_future(
            self._put(m, index, len(payload), _stalled(payload, reached), ChunkChecksums())
        )
        waiter = asyncio.ensure_future(reached.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        assert not task.done(), f"put finished without the whole body: {task!r}"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    # -- begin -----------------------------------------------------------------------------

    @precondition(lambda self: len(self.sessions) < MAX_SESSIONS)
    @rule(size=SIZES, seed=SEED, copy=st.one_of(st.none(), PICK))
    def begin(self, size: int, seed: int, copy: int | None) -> None:
        if copy is not None and self.sessions:
            data = self.sessions[copy % len(self.sessions)].data  # same bytes: one blob
        else:
            data = Random(seed).randbytes(size)
        self._begin(data)

    @initialize(sizes=st.lists(SIZES, min_size=1, max_size=3), seed=SEED)
    def begin_some(self, sizes: list[int], seed: int) -> None:
        rng = Random(seed)
        for size in sizes:
            self._begin(rng.randbytes(size))

    def _begin(self, data: bytes) -> None:
        self.keys += 1
        key = f"key-{self.keys}"
        self.reclaim_overdue()
        session, created = self.run(
            self.env.uploads.begin(self.env.caller, self.env.begin_request(len(data), key))
        )
        assert created
        assert session.state == PENDING
        assert (session.size, session.chunk_size, session.chunk_count) == (
            len(data), CHUNK, -(-len(data) // CHUNK)
        )
        assert session.id not in {m.id for m in self.sessions}
        self.sessions.append(
            Model(id=session.id, key=key, memory_id=session.attrs["memory_id"], data=data,
                  definite=self.now, possible=self.now)
        )

    @precondition(lambda self: self.has(PENDING))
    @rule(pick=PICK, other_size=st.booleans())
    def begin_again(self, pick: int, other_size: bool) -> None:
        m = self.pick(pick, PENDING)
        was_overdue = self.overdue(m)
        self.reclaim_overdue()
        if was_overdue:
            # A key whose session is past its TTL: that session is expired on the spot and a
            # fresh one made (handing back the dead one would only earn a 410 next).
            session, created = self.run(
                self.env.uploads.begin(self.env.caller, self.env.begin_request(m.size, m.key))
            )
            event(f"begin again past TTL: created={created}")
            assert created, "begin returned a session already past its TTL"
            if created:
                self.expired_now(m)
                self.sessions.append(
                    Model(id=session.id, key=m.key, memory_id=session.attrs["memory_id"],
                          data=m.data, definite=self.now, possible=self.now)
                )
            else:
                assert session.id == m.id
            return
        m.possible = self.now
        if other_size:
            self.raises(
                errors.Conflict,
                self.env.uploads.begin(self.env.caller,
                                       self.env.begin_request(m.size + 1, m.key)),
            )
            return
        session, created = self.run(
            self.env.uploads.begin(self.env.caller, self.env.begin_request(m.size, m.key))
        )
        assert not created
        assert session.id == m.id
        assert session.state == PENDING
        assert session.attrs["memory_id"] == m.memory_id

    # -- chunks ----------------------------------------------------------------------------

    @precondition(lambda self: self.has(PENDING))
    @rule(
        pick=PICK,
        index_pick=PICK,
        variant=st.sampled_from([
            "right", "right", "right", "alter", "shorter_length", "longer_length",
            "no_length", "short_body", "long_body", "bad_crc", "bad_sha", "out_of_range",
            "disconnect", "cancel",
        ]),
        checks=st.sampled_from(["none", "crc", "sha", "both"]),
        seed=SEED,
    )
    def put(self, pick: int, index_pick: int, variant: str, checks: str, seed: int) -> None:
        self._send(self.pick(pick, PENDING), index_pick, variant, checks, seed)

    @precondition(lambda self: self.has(PENDING))
    @rule(pick=PICK, index_pick=PICK, checks=st.sampled_from(["none", "crc", "sha", "both"]),
          seed=SEED)
    def put_right(self, pick: int, index_pick: int, checks: str, seed: int) -> None:
        self._send(self.pick(pick, PENDING), index_pick, "right", checks, seed)

    @precondition(lambda self: self.has(PENDING))
    @rule(pick=PICK, seed=SEED)
    def fill(self, pick: int, seed: int) -> None:
        """Send every missing chunk of a session, in random order."""
        m = self.pick(pick, PENDING)
        missing = m.missing
        Random(seed).shuffle(missing)
        for index in missing:
            if m.state != PENDING:
                break
            self._send(m, index, "right", "crc", seed + index)

    def _send(self, m: Model, index_pick: int, variant: str, checks: str, seed: int) -> None:
        rng = Random(seed)
        if self.overdue(m):
            index = index_pick % max(m.count, 1)
            self.raises(errors.Expired, self._put(m, index, len(m.chunk(index)),
                                                  pieces(m.chunk(index), rng), ChunkChecksums()))
            self.expired_now(m)
            event("put: past TTL")
            return
        m.possible = self.now
        if variant == "out_of_range" or m.count == 0:
            index = m.count + index_pick % 3 if index_pick % 2 else -1 - index_pick % 3
            self.raises(errors.InvalidArgument,
                        self._put(m, index, CHUNK, pieces(b"x" * CHUNK, rng), ChunkChecksums()))
            return
        index = index_pick % m.count
        right = m.chunk(index)
        length = len(right)
        held = m.stored.get(index)
        event(f"put: {variant}{' (held)' if held is not None else ''}")

        payload = right
        if variant == "alter":
            altered = bytearray(right)
            altered[rng.randrange(length)] ^= rng.randrange(1, 256)
            payload = bytes(altered)
        crc = crc32c.crc32c(payload)
        digest = hashlib.sha256(payload).digest()
        checksums = ChunkChecksums(
            crc32c=crc if checks in ("crc", "both") else None,
            sha256=digest if checks in ("sha", "both") else None,
        )

        def put(content_length: int | None, body: AsyncIterator[bytes],
                sums: ChunkChecksums = checksums) -> Coroutine[Any, Any, PutResult]:
            return self._put(m, index, content_length, body, sums)

        if variant in ("right", "alter"):
            if held is not None and held != payload:
                self.raises(errors.Conflict, put(length, pieces(payload, rng)))
                return
            result = self.run(put(length, pieces(payload, rng)))
            assert result.session.id == m.id
            assert result.index == index
            assert result.duplicate is (held is not None)
            if held is None:
                m.stored[index] = payload
                m.definite = self.now
            assert result.received_count == len(m.stored)
            assert result.bytes_received == m.received_bytes
        elif variant == "shorter_length":
            self.raises(errors.InvalidArgument,
                        put(rng.randrange(length), pieces(right, rng)))
        elif variant == "longer_length":
            self.raises(errors.PayloadTooLarge,
                        put(length + rng.randint(1, 100), pieces(right + b"\0" * 100, rng)))
        elif variant == "no_length":
            self.raises(errors.InvalidArgument, put(None, pieces(right, rng)))
        elif variant == "short_body":
            self.raises(errors.InvalidArgument,
                        put(length, pieces(right[: rng.randrange(length)], rng)))
        elif variant == "long_body":
            extra = Random(seed + 1).randbytes(rng.randint(1, 3000))
            self.raises(errors.PayloadTooLarge, put(length, pieces(right + extra, rng)))
        elif variant == "bad_crc":
            bad = ChunkChecksums(crc32c=crc ^ (1 << rng.randrange(32)),
                                 sha256=checksums.sha256)
            self.raises(errors.ChecksumMismatch, put(length, pieces(right, rng), bad))
        elif variant == "bad_sha":
            bad = ChunkChecksums(crc32c=checksums.crc32c,
                                 sha256=hashlib.sha256(right + b"!").digest())
            self.raises(errors.ChecksumMismatch, put(length, pieces(right, rng), bad))
        elif variant == "disconnect":
            self.raises(ClientGone, put(length, _broken(right, rng.randrange(length))))
        elif variant == "cancel":
            self.run(self._cancelled_put(m, index, right))
        else:  # pragma: no cover
            raise AssertionError(variant)

    @precondition(lambda self: self.has(PENDING))
    @rule(picks=st.lists(st.tuples(PICK, PICK), min_size=2, max_size=4), seed=SEED)
    def put_concurrently(self, picks: list[tuple[int, int]], seed: int) -> None:
        """Right chunks sent at once, the same chunk sometimes twice: one write, the rest
        duplicates, whichever request gets there first."""
        live = [m for m in self.sessions
                if m.state == PENDING and m.count and not self.overdue(m)]
        if not live:
            return
        rng = Random(seed)
        jobs = [(live[p % len(live)], i) for p, i in picks]
        jobs = [(m, i % m.count) for m, i in jobs]

        def payload(m: Model, i: int) -> bytes:
            return m.stored.get(i, m.chunk(i))  # what was sent before, even if altered

        async def all_at_once() -> list[PutResult]:
            return await asyncio.gather(*(
                self._put(m, i, len(m.chunk(i)), pieces(payload(m, i), rng, max_pieces=8),
                          ChunkChecksums(crc32c=crc32c.crc32c(payload(m, i))))
                for m, i in jobs
            ))

        results = self.run(all_at_once())
        firsts: dict[tuple[str, int], int] = {}
        for (m, i), result in zip(jobs, results, strict=True):
            assert (result.session.id, result.index) == (m.id, i)
            event(f"concurrent put: duplicate={result.duplicate}")
            if not result.duplicate:
                firsts[(m.id, i)] = firsts.get((m.id, i), 0) + 1
        for m, i in {(m.id, i): (m, i) for m, i in jobs}.values():
            fresh = i not in m.stored
            assert firsts.get((m.id, i), 0) == (1 if fresh else 0), (m.id, i)
            if fresh:
                m.stored[i] = m.chunk(i)
                m.definite = self.now
            m.possible = self.now

    @precondition(lambda self: self.has(PENDING))
    @rule(pick=PICK, index_pick=PICK, how=st.sampled_from(["abort", "expire"]))
    def interrupted_put(self, pick: int, index_pick: int, how: str) -> None:
        """A chunk still streaming when its session is aborted, or expires because the
        writer's lease lapsed (the manual clock jumps; the lease is never renewed): the put
        must fail, and nothing of it may be left behind (claim, staging file, part)."""
        m = self.pick(pick, PENDING)
        missing = m.missing
        if not missing or self.overdue(m):
            return
        index = missing[index_pick % len(missing)]
        payload = m.chunk(index)
        release = asyncio.Event()

        async def body(reached: asyncio.Event) -> AsyncIterator[bytes]:
            yield payload[: len(payload) // 2]
            reached.set()
            await release.wait()
            yield payload[len(payload) // 2:]

        async def start() -> asyncio.Future[PutResult]:
            reached = asyncio.Event()
            task = asyncio.ensure_future(
                self._put(m, index, len(payload), body(reached), ChunkChecksums())
            )
            waiter = asyncio.ensure_future(reached.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
            assert not task.done(), f"put finished without the whole body: {task!r}"
            return task

        async def resume(task: asyncio.Future[PutResult]) -> None:
            release.set()
            with pytest.raises((errors.NotFound, errors.Expired)):
                await task

        task = self.run(start())
        m.possible = self.now
        event(f"interrupted put: {how}")
        if how == "abort":
            self.run(self.env.uploads.abort(self.env.caller, m.id))
            m.state, m.ended_at = ABORTED, self.now
        else:
            self.env.clock.advance(TTL + self.env.settings.claim_lease + 1)
            self.reap()
            assert m.state == EXPIRED
        self.run(resume(task))

    # -- finish ----------------------------------------------------------------------------

    @precondition(lambda self: self.has(PENDING))
    @rule(
        pick=PICK,
        variant=st.sampled_from([
            "intended", "intended", "actual", "upper", "wrong_sha", "malformed",
            "size_plus", "size_minus",
        ]),
    )
    def finish(self, pick: int, variant: str) -> None:
        m = self.pick(pick, PENDING)
        env = self.env
        complete = not m.missing
        actual_sha = sha(m.actual) if complete else None
        given = {
            "intended": sha(m.data),
            "actual": actual_sha or sha(m.data),
            "upper": (actual_sha or sha(m.data)).upper(),
            "wrong_sha": sha(m.data + b"!"),
            "malformed": "not-a-digest",
        }.get(variant, sha(m.data))
        size = {"size_plus": m.size + 1,
                "size_minus": m.size - 1 if m.size else m.size + 2}.get(variant, m.size)

        def finish() -> Coroutine[Any, Any, Any]:
            return env.uploads.finish(env.caller, m.id, size, given)

        if variant == "malformed":
            self.raises(errors.InvalidArgument, finish())
            return
        if self.overdue(m):
            self.raises(errors.Expired, finish())
            self.expired_now(m)
            return
        m.possible = self.now
        event(f"finish: {variant}, complete={complete}, poisoned={complete and m.actual != m.data}")
        if size != m.size:
            self.raises(errors.LengthMismatch, finish())
        elif not complete:
            exc = self.raises(errors.Incomplete, finish())
            assert exc.extra["missing"] == m.missing
            assert exc.extra["missing_count"] == len(m.missing)
        elif given.lower() != actual_sha:
            self.raises(errors.ChecksumMismatch, finish())
        else:
            session, memory = self.run(finish())
            assert session.id == m.id
            assert session.state == COMMITTED
            assert session.result_sha256 == actual_sha
            assert memory.id == m.memory_id
            asset = memory.assets["original"]
            assert (asset.size, asset.sha256) == (m.size, actual_sha)
            assert self.run(env.read_asset(asset.storage_key, m.size)) == m.actual
            m.state, m.ended_at, m.result_sha = COMMITTED, self.now, actual_sha
            event(f"committed ({m.count} chunks)")

    @precondition(lambda self: self.has(COMMITTED))
    @rule(pick=PICK, variant=st.sampled_from(["same", "upper", "other_sha", "other_size"]))
    def finish_again(self, pick: int, variant: str) -> None:
        m = self.pick(pick, COMMITTED)
        env = self.env
        assert m.result_sha is not None
        given = {"upper": m.result_sha.upper(),
                 "other_sha": sha(m.actual + b"!")}.get(variant, m.result_sha)
        size = m.size + 1 if variant == "other_size" else m.size
        finish = env.uploads.finish(env.caller, m.id, size, given)
        if variant in ("other_sha", "other_size"):
            self.raises(errors.Conflict, finish)
            return
        session, memory = self.run(finish)
        assert (session.id, session.state, session.result_sha256) == (
            m.id, COMMITTED, m.result_sha
        )
        assert memory.id == m.memory_id
        assert memory.assets["original"].sha256 == m.result_sha

    # -- abort, expiry ---------------------------------------------------------------------

    @precondition(lambda self: self.has(PENDING))
    @rule(pick=PICK)
    def abort(self, pick: int) -> None:
        m = self.pick(pick, PENDING)
        env = self.env
        if self.overdue(m):
            # Aborting a session that is past its TTL: gone either way.
            try:
                self.run(env.uploads.abort(env.caller, m.id))
            except errors.Expired:
                self.expired_now(m)
            else:
                m.state, m.ended_at = ABORTED, self.now
            return
        self.run(env.uploads.abort(env.caller, m.id))
        m.state, m.ended_at = ABORTED, self.now
        self.raises(errors.NotFound, env.uploads.sessions.get(m.id, env.caller.id))
        assert m.id not in env.staged_files()

    @precondition(lambda self: self.has(PENDING))
    @rule(pick=PICK)
    def poll(self, pick: int) -> None:
        """A status request: past the TTL it expires the session on the spot."""
        m = self.pick(pick, PENDING)
        env = self.env
        if self.overdue(m):
            event("poll: past TTL")
            self.raises(errors.Expired, env.uploads.status(env.caller, m.id))
            self.expired_now(m)
            assert m.id not in env.staged_files()
        else:
            session, received, total = self.run(env.uploads.status(env.caller, m.id))
            assert session.state == PENDING
            assert (received, total) == (sorted(m.stored), m.received_bytes)

    @precondition(lambda self: self.has(COMMITTED, ABORTED, EXPIRED, PURGED))
    @rule(pick=PICK, op=st.sampled_from(["put", "finish", "abort", "status"]), seed=SEED)
    def touch_ended(self, pick: int, op: str, seed: int) -> None:
        """Requests for a session that is over: each answers with the session's fate."""
        m = self.pick(pick, COMMITTED, ABORTED, EXPIRED, PURGED)
        event(f"ended: {op} on {m.state}")
        env = self.env
        rng = Random(seed)
        if op == "put":
            index = rng.randrange(max(m.count, 1))
            coro: Coroutine[Any, Any, Any] = self._put(
                m, index, len(m.chunk(index)), pieces(m.chunk(index), rng), ChunkChecksums()
            )
        elif op == "finish":
            coro = env.uploads.finish(env.caller, m.id, m.size, m.result_sha or sha(m.data))
        elif op == "abort":
            coro = env.uploads.abort(env.caller, m.id)
        else:
            coro = env.uploads.status(env.caller, m.id)
        if m.state in (ABORTED, PURGED):
            self.raises(errors.NotFound, coro)
        elif m.state == EXPIRED:
            # Expired (410) until the grace period ends; abort may also say not_found.
            self.raises((errors.NotFound, errors.Expired) if op == "abort" else errors.Expired,
                        coro)
        elif op in ("put", "abort"):
            self.raises(errors.Conflict, coro)
        else:
            session, *rest = self.run(coro)
            assert (session.id, session.state) == (m.id, COMMITTED)
            if op == "status":  # a committed session holds every chunk
                assert rest == [list(range(m.count)), m.size]

    @rule(
        step=st.one_of(
            st.tuples(st.just("by"), st.integers(1, 10)),
            st.tuples(st.just("by"), st.integers(1, TTL // 2)),
            st.tuples(st.just("by"), st.integers(1, 2 * TTL + 50)),
            st.tuples(st.just("to_expiry"), PICK, st.sampled_from([-1, 0, 1])),
        ),
        reap=st.booleans(),
    )
    def advance(self, step: tuple[Any, ...], reap: bool) -> None:
        clock = self.env.clock
        if step[0] == "by":
            clock.advance(step[1])
        else:
            # Right up to, onto or just past a pending session's known expiry.
            exact = [m for m in self.sessions if m.state == PENDING and m.definite == m.possible]
            target = (exact[step[1] % len(exact)].definite + TTL + step[2]) if exact else 0
            clock.advance(max(target - self.now, 1))
        if reap:
            self.reap()

    @rule()
    def reap(self) -> None:
        due = [m for m in self.sessions if m.state == PENDING and self.overdue(m)]
        count = self.run(self.env.uploads.sessions.expire_due())
        assert count == len(due), (count, [m.id for m in due])
        event(f"reaped {min(count, 2)}+")
        get = self.env.uploads.sessions.get
        for m in due:
            self.expired_now(m)
            self.raises(errors.Expired, get(m.id, self.env.caller.id))
        for m in self.sessions:
            if m.state == EXPIRED and m.ended_at is not None and m.ended_at < self.now - GRACE:
                m.state = PURGED
                event("purged")
                self.raises(errors.NotFound, get(m.id, self.env.caller.id))

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def service_matches_model(self) -> None:
        # The check lists the caller's sessions, and listing expires those past their TTL
        # (as begin does): the model does the same first.
        self.reclaim_overdue()
        self.run(self._check())

    async def _check(self) -> None:
        env = self.env
        caller = env.caller
        now = self.now
        listed = {s.id: s for s in await env.uploads.list_sessions(caller)}
        pending = {m.id for m in self.sessions if m.state == PENDING}
        assert set(listed) == pending, "pending sessions lost or leaked"
        assert env.staged_files() == pending, "staging files leaked or lost"
        all_parts = await env.part_rows()
        assert [p for p in all_parts if p["state"] != "received"] == [], (
            "a chunk claim was left behind")
        for session_id in pending:  # the hash frontier catches up in the background
            await env.uploads.sessions.join_hashing(session_id)
        def read(conn: sa.Connection) -> tuple[dict[str, Any], dict[str, int]]:
            rows = {r["id"]: r for r in conn.execute(sa.select(upload_sessions)).mappings()}
            refcounts = {sha: int(n) for sha, n in
                         conn.execute(sa.select(blobs.c.sha256, blobs.c.refcount))}
            return rows, refcounts

        rows, counts = await env.db.query(read)

        for m in self.sessions:
            row = rows.get(m.id)
            if m.state == PENDING:
                assert row is not None
                assert row["state"] == PENDING
                assert m.definite <= row["last_seen"] <= m.possible, (
                    "last_seen outside the model's bounds", row["last_seen"], m.definite,
                    m.possible)
                assert row["expires_at"] == row["last_seen"] + TTL
                received = (sorted(m.stored), m.received_bytes)
                if row["expires_at"] > now:
                    session, indices, total = await env.uploads.status(caller, m.id)
                    assert session.state == PENDING
                    assert (indices, total) == received
                else:  # status would expire it on the spot: read without touching it
                    assert await env.uploads.sessions.received(listed[m.id]) == received
                # The frontier covers exactly the contiguous received prefix, and its state
                # is the SHA-256 of those bytes.
                prefix = m.prefix
                assert row["hashed_offset"] == len(prefix)
                state = Sha256State.from_bytes(row["hash_state"])
                assert state.length == len(prefix)
                assert state.hexdigest() == sha(prefix)
            elif m.state == COMMITTED:
                assert row is not None
                assert (row["state"], row["result_sha256"]) == (COMMITTED, m.result_sha)
            elif m.state == EXPIRED:
                assert row is not None
                assert (row["state"], row["ended_at"]) == (EXPIRED, m.ended_at)
            else:  # aborted, or expired and purged after the grace period
                assert row is None, (m.state, row)
        assert set(rows) == {m.id for m in self.sessions if m.state not in (ABORTED, PURGED)}

        # Parts exist only for pending sessions and say what the model says was received.
        parts = {(p["session_id"], p["offset"]): p for p in all_parts}
        expected_parts = {
            (m.id, i * CHUNK): chunk
            for m in self.sessions if m.state == PENDING for i, chunk in m.stored.items()
        }
        assert set(parts) == set(expected_parts)
        for key, chunk in expected_parts.items():
            part = parts[key]
            assert (part["length"], part["crc32c"]) == (len(chunk), crc32c.crc32c(chunk))

        # One memory per pending or committed session; the committed ones hold the asset.
        page = await env.capsules.list_memories(caller, env.capsule_id, limit=500)
        memories = {mem.id: mem for mem in page.items}
        live = {m.memory_id: m for m in self.sessions if m.state in (PENDING, COMMITTED)}
        assert set(memories) == set(live), "memories leaked or lost"
        for memory_id, m in live.items():
            assets = memories[memory_id].assets
            if m.state == PENDING:
                assert assets == {}
            else:
                asset = assets["original"]
                assert (asset.size, asset.sha256) == (m.size, m.result_sha)
                assert env.store.blob_path(asset.storage_key).stat().st_size == m.size

        # Each blob is counted once per committed session holding it.
        expected: dict[str | None, int] = {}
        for m in self.sessions:
            if m.state == COMMITTED:
                expected[m.result_sha] = expected.get(m.result_sha, 0) + 1
        assert counts == expected


TestUploadMachine = UploadMachine.TestCase


# -- deterministic scenarios -------------------------------------------------------------


async def _put_all(env: InProcess, session_id: str, data: bytes, index: int,
                   seed: int = 0) -> PutResult:
    chunk = data[index * CHUNK:(index + 1) * CHUNK]
    body = pieces(chunk, Random(seed))
    async with contextlib.aclosing(body):
        return await env.uploads.put_chunk(
            env.caller, session_id, index, len(chunk), body,
            ChunkChecksums(crc32c=crc32c.crc32c(chunk)),
        )


async def test_sparse_interleaving_of_two_sessions() -> None:
    rng = Random(7)
    a, b = rng.randbytes(3 * CHUNK), rng.randbytes(3 * CHUNK - 123)
    async with inprocess() as env:
        sa_, _ = await env.uploads.begin(env.caller, env.begin_request(len(a), "a"))
        sb_, _ = await env.uploads.begin(env.caller, env.begin_request(len(b), "b"))
        assert sa_.chunk_count == sb_.chunk_count == 3
        sessions = {"A": (sa_, a), "B": (sb_, b)}
        seen: dict[str, list[int]] = {"A": [], "B": []}
        for name, index in [("A", 0), ("B", 0), ("A", 2), ("B", 2), ("A", 1), ("B", 1)]:
            session, data = sessions[name]
            result = await _put_all(env, session.id, data, index, seed=index)
            assert not result.duplicate
            seen[name].append(index)
            _, received, total = await env.uploads.status(env.caller, session.id)
            assert received == sorted(seen[name])
            assert total == sum(len(data[i * CHUNK:(i + 1) * CHUNK]) for i in seen[name])
        for session, data in sessions.values():
            done, memory = await env.uploads.finish(env.caller, session.id, len(data),
                                                    sha(data))
            assert done.state == COMMITTED
            asset = memory.assets["original"]
            assert (asset.size, asset.sha256) == (len(data), sha(data))
            assert await env.read_asset(asset.storage_key, len(data)) == data
        assert env.staged_files() == set()
        assert await env.part_rows() == []
        assert await env.uploads.list_sessions(env.caller) == []


@pytest.mark.parametrize("order", [[3, 1, 2, 0], [1, 0, 3, 2], [0, 2, 3, 1], [2, 3, 0, 1]])
async def test_hash_frontier_advances_over_out_of_order_chunks(order: list[int]) -> None:
    data = Random(11).randbytes(4 * CHUNK - 7)
    async with inprocess() as env:
        session, _ = await env.uploads.begin(env.caller, env.begin_request(len(data), "f"))
        assert session.chunk_count == 4
        have: set[int] = set()
        for index in order:
            await _put_all(env, session.id, data, index, seed=index)
            have.add(index)
            contiguous = 0
            while contiguous in have:
                contiguous += 1
            frontier = min(contiguous * CHUNK, len(data))
            await env.uploads.sessions.join_hashing(session.id)
            row = await env.session_row(session.id)
            assert row is not None
            assert row["hashed_offset"] == frontier, (order, index)
            state = Sha256State.from_bytes(row["hash_state"])
            assert state.hexdigest() == sha(data[:frontier])
        # The whole object is hashed before finish is asked for it.
        row = await env.session_row(session.id)
        assert row is not None
        assert row["hashed_offset"] == len(data)
        done, memory = await env.uploads.finish(env.caller, session.id, len(data), sha(data))
        assert done.result_sha256 == sha(data)
        asset = memory.assets["original"]
        assert await env.read_asset(asset.storage_key, len(data)) == data
        left = await env.db.query(lambda conn: conn.execute(sa.select(upload_parts)).all())
        assert left == []
