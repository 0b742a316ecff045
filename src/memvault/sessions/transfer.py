"""Receiving one chunk: claim its byte range, stream it to storage, mark it received.

A chunk's range is *claimed* (a row in ``upload_parts``) before a byte is written, so two
requests never write the same range at once. The claim is a lease the writer renews while it
streams; a killed process stops renewing and its claim is taken over after ``claim_lease``.
A second request for a claimed or received range only digests its body and compares:
duplicate → success, different bytes → ``conflict``. Any failure or cancellation drops the
claim (shielded), so the chunk is simply not received and the session stays resumable.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
import structlog

from memvault.aio import uncancelled
from memvault.clock import Clock
from memvault.errors import (
    Conflict,
    Expired,
    InvalidArgument,
    MemvaultError,
    PayloadTooLarge,
    RequestTimeout,
    Unavailable,
)
from memvault.hashing import Sha256State
from memvault.metadata import Database
from memvault.metadata.schema import upload_parts, upload_sessions
from memvault.sessions.frontier import Frontier, save_frontier
from memvault.sessions.model import (
    EXPIRED,
    PENDING,
    ChunkChecksums,
    PutResult,
    Session,
    SessionPolicy,
    session_not_found,
)
from memvault.sessions.streaming import Body, ChunkBody, ChunkDigests, chunk_body, stream_chunk
from memvault.storage.base import (
    BlobStore,
    PartHolder,
    PartWriter,
    StagedHasher,
    StagingGone,
    WriterLiveness,
)

log = structlog.get_logger("memvault.sessions")

# Statements built once, run with their parameters (docs/decisions.md, "Statements built
# once"): building a statement cost several times the CPU of running it. A parameter named
# like a column of an updated table would set that column, hence the ``b_`` names.
_THE_PART = sa.and_(upload_parts.c.session_id == sa.bindparam("b_session"),
                    upload_parts.c.offset == sa.bindparam("b_offset"))
_OUR_CLAIM = sa.and_(_THE_PART, upload_parts.c.claim == sa.bindparam("held"),
                     upload_parts.c.state == "writing")
_PART_CLAIM = sa.select(upload_parts.c.state, upload_parts.c.claimed_at,
                        upload_parts.c.claim).where(_THE_PART)
_PART_RECEIPT = sa.select(upload_parts.c.state, upload_parts.c.crc32c,
                          upload_parts.c.claimed_at).where(_THE_PART)
_NEW_PART = sa.insert(upload_parts)
_TAKE_OVER = sa.update(upload_parts).where(_THE_PART).values(
    claim=sa.bindparam("new_claim"), claimed_at=sa.bindparam("now"))
_RENEW = sa.update(upload_parts).where(_OUR_CLAIM).values(claimed_at=sa.bindparam("now"))
_GIVE_BACK = sa.update(upload_parts).where(_OUR_CLAIM).values(
    claim=sa.bindparam("previous"), claimed_at=sa.bindparam("previous_at"))
_RELEASE = sa.delete(upload_parts).where(_OUR_CLAIM)
_MARK_RECEIVED = sa.update(upload_parts).where(_OUR_CLAIM).values(
    state="received", crc32c=sa.bindparam("crc"), received_at=sa.bindparam("now"),
    claim=None, receipt=sa.bindparam("new_receipt"))
_TOUCH = sa.update(upload_sessions).where(
    upload_sessions.c.id == sa.bindparam("b_session"), upload_sessions.c.state == PENDING
).values(last_seen=sa.bindparam("now"), expires_at=sa.bindparam("until"))
_FRONTIER = sa.select(upload_sessions.c.hashed_offset, upload_sessions.c.hash_state).where(
    upload_sessions.c.id == sa.bindparam("b_session"))
_STATE = sa.select(upload_sessions.c.state).where(
    upload_sessions.c.id == sa.bindparam("b_session"))
_RECEIVED_COUNTS = sa.select(
    sa.func.count(), sa.func.coalesce(sa.func.sum(upload_parts.c.length), 0)
).where(upload_parts.c.session_id == sa.bindparam("b_session"),
        upload_parts.c.state == "received")


class _Ended(Exception):
    """The session stopped being pending while this chunk was on its way."""


class ChunkReceiver:
    def __init__(
        self,
        db: Database,
        store: BlobStore,
        clock: Clock,
        policy: SessionPolicy,
        frontier: Frontier,
        lost: Callable[[Session], Awaitable[MemvaultError | None]],
    ) -> None:
        self.db = db
        self.store = store
        self.clock = clock
        self.policy = policy
        self._frontier = frontier
        self._lost = lost
        """Ends a pending session whose staged bytes are gone; its error, or None if it is
        not lost (a finish is moving the bytes into place right now)."""
        # Adoption hashes back a chunk's own bytes while it streams: only where staged bytes
        # in progress are readable (the local store; S3 parts are in a spool file until sent).
        self._hasher = store if isinstance(store, StagedHasher) else None
        self._liveness = store if isinstance(store, WriterLiveness) else None
        self._writer_id = self._liveness.writer_id if self._liveness is not None else "-"
        self._adopts = self._hasher is not None and not isinstance(store, PartHolder)

    async def put(
        self,
        session: Session,
        index: int,
        content_length: int | None,
        body: Body,
        checksums: ChunkChecksums,
    ) -> PutResult:
        """Receive chunk ``index`` of a live session; nothing counts unless every check passes."""
        session_id = session.id
        if session.state != PENDING:
            raise Conflict(f"upload session {session_id} is {session.state}", state=session.state)
        if not 0 <= index < session.chunk_count:
            raise InvalidArgument(
                f"chunk index {index} is outside 0..{session.chunk_count - 1}"
                if session.chunk_count else
                "this upload has no chunks (a zero-byte file): finish it without sending any",
                chunk_count=session.chunk_count,
            )
        offset, length = session.chunk_range(index)
        if content_length is None:
            raise InvalidArgument("Content-Length is required for a chunk")
        if content_length > length:
            raise PayloadTooLarge(
                f"chunk {index} is {length} bytes; the request declares {content_length}",
                limit=length,
            )
        if content_length < length:
            raise InvalidArgument(
                f"chunk {index} must be exactly {length} bytes; the request declares "
                f"{content_length}",
                expected=length,
            )
        # "<writer id>.<random>": the writer id says whose process holds the claim, so a
        # claim left by a process that has ended can be taken over at once.
        claim = f"{self._writer_id}.{secrets.token_hex(8)}"
        # Registered before the claim reads the frontier, so a hand-off there is never missed.
        adoption = self._frontier.expect(session.id, offset) if self._adopts else None
        try:
            return await self._receive(session, index, offset, length, claim,
                                       chunk_body(body), checksums, adoption)
        finally:
            if adoption is not None:
                self._frontier.forget(session.id, offset, adoption)

    async def _receive(
        self,
        session: Session,
        index: int,
        offset: int,
        length: int,
        claim: str,
        body: ChunkBody,
        checksums: ChunkChecksums,
        adoption: asyncio.Future[Sha256State] | None,
    ) -> PutResult:
        claiming = _elapsed_clock()
        try:
            held, prefix, taken_from = await self._claim(session, offset, length, claim)
        except _Ended as exc:
            raise await self._ended(session) from exc
        except BaseException:
            # Cancelled while the claim was being written: it may have committed anyway.
            await self._release_quietly(session, offset, claim)
            raise
        if held:
            duplicate = await self._compare(session, offset, length, body, checksums)
            return await self._result(session, index, duplicate=duplicate)

        async def catch_up(state: Sha256State, written: int) -> None:
            assert self._hasher is not None
            await self._hasher.hash_staged(session.staging_key, offset, written, state)

        lease: _Lease | None = None
        try:
            digests = ChunkDigests(want_sha256=checksums.sha256 is not None, prefix=prefix,
                                   adoption=adoption if prefix is None else None,
                                   catch_up=catch_up)
            writer = await self._open_writer(session, index, offset, length, claim,
                                             hashed=prefix is not None, taken_from=taken_from)
            try:
                if (_elapsed_clock() - claiming > self.policy.claim_lease / 2
                        and not await self._still_ours(session.id, offset, claim)):
                    # Stood still between the claim and the lock for long enough that
                    # another request may have taken the chunk over, written it and let go
                    # of the lock: holding the lock now, write only if the claim is still
                    # ours (and renewed). Half a lease: servers' clocks must agree to within
                    # that (NTP).
                    raise _Ended(session.id)
            except BaseException:
                await asyncio.shield(writer.abandon())  # and with it the range's lock
                raise
            lease = _Lease()
            renewing = asyncio.create_task(self._renew_claim(session.id, offset, claim, lease))
            try:
                try:
                    try:
                        async with asyncio.timeout(self.policy.chunk_timeout) as lease.body:
                            await stream_chunk(body, length, digests, writer,
                                               self.policy.write_batch, self.policy.pace,
                                               lease.arrived)
                    finally:
                        lease.body = None
                    digests.check(checksums)
                    if digests.prefix is not None:
                        # Every byte hashed: the next chunk, if it is streaming, continues
                        # from here now, not after this one's fsync and mark.
                        self._frontier.reached(session.id, offset + length, digests.prefix)
                except BaseException:
                    await asyncio.shield(writer.abandon())
                    raise
                # Still under the claim's lease: closing may itself be a transfer (an S3
                # part upload), and the claim must not lapse while it runs.
                closing = asyncio.ensure_future(writer.close(durable=self.policy.fsync))
                try:
                    await self._adopt_while(closing, digests, session.id, offset + length)
                finally:
                    receipt = await asyncio.shield(closing)
            finally:
                renewing.cancel()
                await asyncio.gather(renewing, return_exceptions=True)
            stored = prefix if digests.adopted_from is None else None
            count, total = await self._mark_received(
                session, offset, length, claim, digests.crc, stored, receipt
            )
            if digests.adopted_from is not None and digests.prefix is not None:
                # Hashed from a state not (yet) stored: for the frontier to take when it
                # gets here with exactly that state.
                self._frontier.precomputed(session.id, offset, digests.adopted_from,
                                           offset + length, digests.prefix)
        except StagingGone as exc:
            await self._release_quietly(session, offset, claim)
            raise await self._ended(session, staging_gone=True) from exc
        except _Ended as exc:
            await self._release_quietly(session, offset, claim)
            raise await self._ended(session) from exc
        except TimeoutError as exc:
            await self._release_quietly(session, offset, claim)
            if lease is not None and lease.lost:
                # Cut short: another request took the chunk over (this body stood still),
                # or the session ended meanwhile.
                raise await self._ended(session) from exc
            raise _too_slow(index, self.policy.chunk_timeout) from exc
        except BaseException:
            await self._release_quietly(session, offset, claim)
            raise
        log.debug("session.chunk", session_id=session.id, owner=session.owner,
                  scope=session.idem_scope, index=index, length=length)
        # Hash whatever this chunk made contiguous (chunks that arrived early, past a gap),
        # in the background: this request's bytes are safe and it need not wait, unless that
        # hashing has fallen far behind (``Frontier.keep_up``). A chunk hashed as it streamed
        # has nothing behind it left to hash.
        self._frontier.kick(session.id)
        if digests.prefix is None:
            await self._keep_up(session, offset + length - self.policy.hash_lag)
        return PutResult(session, index, False, count, total)

    async def _keep_up(self, session: Session, target: int) -> None:
        try:
            async with asyncio.timeout(_KEEP_UP_LIMIT):
                await self._frontier.keep_up(session.id, target)
        except TimeoutError:
            # A stalled advancer is the finish's problem (it hashes what is left), not a
            # reason to hold every chunk: answer, the chunk is received.
            log.warning("frontier.lagging", session_id=session.id, target=target,
                        waited=_KEEP_UP_LIMIT)

    async def _adopt_while(self, closing: asyncio.Future[str | None], digests: ChunkDigests,
                           session_id: str, end: int) -> None:
        """While the chunk's bytes are being synced: if the state at its start arrives
        meanwhile, hash the chunk (from the page cache) and hand its end state on."""
        if digests.prefix is not None or digests.adoption is None:
            return
        either: set[asyncio.Future[Any]] = {closing, digests.adoption}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        await digests.adopt()
        if digests.prefix is not None:
            self._frontier.reached(session_id, end, digests.prefix)

    async def _claim(
        self, session: Session, offset: int, length: int, claim: str
    ) -> tuple[bool, Sha256State | None, tuple[str, float] | None]:
        """Claim ``[offset, offset+length)`` for writing.

        Returns ``(held, prefix, taken_from)``: ``held`` when another request holds or has
        received the range; ``prefix`` is the stored hash state when the range starts at the
        frontier, so the chunk can be hashed as it streams; ``taken_from`` the claim and its
        time when a lapsed claim was taken over (to give back if its writer is still there).
        """
        now = self.clock.now()
        stale = now - self.policy.claim_lease
        part = {"b_session": session.id, "b_offset": offset}
        holder: str | None = None

        def claim_range(conn: sa.Connection, ended: str | None) -> Any:
            nonlocal holder
            if not self._touch(conn, session.id, now):
                raise _Ended(session.id)  # committed, aborted or expired since it was loaded
            existing = conn.execute(_PART_CLAIM, part).first()
            taken = None
            if existing is None:
                conn.execute(_NEW_PART, {"session_id": session.id, "offset": offset,
                                         "length": length, "state": "writing",
                                         "claim": claim, "claimed_at": now})
            elif existing.state == "writing" and (existing.claimed_at < stale
                                                  or existing.claim == ended):
                # The writer stopped renewing its lease, or its process has ended: take it
                # over.
                conn.execute(_TAKE_OVER, {**part, "new_claim": claim, "now": now})
                taken = (str(existing.claim), float(existing.claimed_at))
            else:
                holder = existing.claim if existing.state == "writing" else None
                return None
            return conn.execute(_FRONTIER, {"b_session": session.id}).one(), taken

        claimed = await self.db.transact(functools.partial(claim_range, ended=None),
                                         durable=False)
        if claimed is None and holder is not None and await self._writer_ended(holder):
            # Held by a process that has ended (a server killed mid-chunk and restarted):
            # no need to wait for its lease to lapse.
            claimed = await self.db.transact(functools.partial(claim_range, ended=holder),
                                             durable=False)
        if claimed is None:
            return True, None, None
        frontier, taken = claimed
        if frontier.hashed_offset != offset:
            return False, None, taken
        try:
            return False, Sha256State.from_bytes(frontier.hash_state), taken
        except ValueError:
            return False, None, taken

    async def _compare(
        self,
        session: Session,
        offset: int,
        length: int,
        body: ChunkBody,
        checksums: ChunkChecksums,
    ) -> bool:
        """Digest a body for a range someone else holds; True if it matches what is stored."""
        digests = ChunkDigests(want_sha256=checksums.sha256 is not None)
        try:
            async with asyncio.timeout(self.policy.chunk_timeout):
                await stream_chunk(body, length, digests, None, self.policy.write_batch,
                                   self.policy.pace)
        except TimeoutError as exc:
            raise _too_slow(offset // session.chunk_size, self.policy.chunk_timeout) from exc
        digests.check(checksums)
        where = {"b_session": session.id, "b_offset": offset}
        while True:
            part = await self.db.query(lambda conn: conn.execute(_PART_RECEIPT, where).first())
            if part is None:
                ended = await self._ended(session)
                if not isinstance(ended, Unavailable):
                    raise ended
                raise Unavailable(
                    "a concurrent transfer of this chunk failed; send it again",
                    retry_after=1,
                )
            if part.state == "received":
                if part.crc32c == digests.crc:
                    return True
                raise Conflict(
                    f"chunk at offset {offset} was already received with different bytes",
                    offset=offset,
                )
            if part.claimed_at < self.clock.now() - self.policy.claim_lease:
                raise Unavailable(
                    "the transfer that held this chunk stopped; send it again",
                    retry_after=1,
                )
            await asyncio.sleep(self.policy.claim_poll)

    async def _writer_ended(self, claim: str) -> bool:
        """Whether the process that made ``claim`` has certainly ended."""
        writer, dot, _ = claim.partition(".")
        return bool(dot) and self._liveness is not None and await self._liveness.writer_gone(
            writer)

    async def _renew_claim(self, session_id: str, offset: int, claim: str,
                           lease: _Lease) -> None:
        """Keep a claim's lease fresh while its transfer moves, and cut the transfer short
        once the claim is no longer its own.

        A dead writer stops renewing, and so does one whose body stands still (a client
        whose network went away without closing the connection): after ``claim_lease`` a
        retry of the chunk may take it over instead of waiting minutes for the slow-body
        deadline. Bytes arriving again renew it, if nobody has.
        """
        part = {"b_session": session_id, "b_offset": offset}
        while True:
            await asyncio.sleep(self.policy.claim_lease / 3)
            if lease.moved():
                ours = await self.db.transact(
                    functools.partial(_renew, session_id, offset, claim, self.clock.now()),
                    durable=False,
                )
            else:
                holder = await self.db.query(lambda conn: conn.execute(_PART_CLAIM,
                                                                       part).first())
                ours = (holder is not None and holder.state == "writing"
                        and holder.claim == claim)
            if not ours:
                lease.cut()
                return

    async def _open_writer(self, session: Session, index: int, offset: int, length: int,
                           claim: str, *, hashed: bool,
                           taken_from: tuple[str, float] | None) -> PartWriter:
        """The store's writer for the chunk's range.

        After taking over a lapsed claim, the store's lock on the range may still be held by
        its writer, alive but standing still: a writer whose body stopped sees its claim gone
        within a third of a lease and lets go, so wait up to a lease. Past that (a write stuck
        on the disk, a paused process) the claim goes back to that writer, and this request
        answers 503.
        """
        loop = asyncio.get_running_loop()
        until = loop.time() + (self.policy.claim_lease if taken_from is not None else 0)
        while True:
            try:
                return await self.store.open_writer(session.staging_key, offset, length=length,
                                                    part=index, hashed=hashed)
            except Unavailable:
                if taken_from is None:
                    raise
                if loop.time() >= until:
                    await self._give_back(session, offset, claim, taken_from)
                    raise
            await asyncio.sleep(2 * self.policy.claim_poll)

    async def _mark_received(
        self,
        session: Session,
        offset: int,
        length: int,
        claim: str,
        crc: int,
        prefix: Sha256State | None,
        receipt: str | None,
    ) -> tuple[int, int]:
        """Count the chunk as received and, if it was hashed in flight, move the frontier.

        Returns the session's received chunk count and bytes, read in the same transaction.

        Not a durable commit: after a power loss the mark may be gone and the client sends the
        chunk again (its bytes were fdatasynced already). Begin and finish commit durably, and a
        durable commit makes every earlier one durable too.
        """
        now = self.clock.now()

        def mark(conn: sa.Connection) -> tuple[int, int]:
            done = conn.execute(_MARK_RECEIVED, {
                "b_session": session.id, "b_offset": offset, "held": claim,
                "crc": crc, "now": now, "new_receipt": receipt})
            if done.rowcount != 1 or not self._touch(conn, session.id, now):
                raise _Ended(session.id)
            if prefix is not None:
                save_frontier(conn, session.id, session.staging_key, session.size, offset,
                              offset + length, prefix, announce=self._frontier.announces)
            return _received_counts(conn, session.id)

        return await self.db.transact(mark, durable=False)

    async def _release_quietly(self, session: Session, offset: int, claim: str) -> None:
        """Drop our claim; settled even if the request is cancelled meanwhile."""
        ours = {"b_session": session.id, "b_offset": offset, "held": claim}
        # On SQLite the database's thread hand-off settles it anyway; on PostgreSQL this does.
        try:
            await uncancelled(self.db.transact(lambda conn: conn.execute(_RELEASE, ours),
                                               durable=False))
        except Exception as exc:  # noqa: BLE001 - the error being handled is the answer
            # A database that cannot take this write (full, gone) must not replace the
            # error the chunk met; the claim's lease runs out by itself.
            log.warning("session.release_failed", session_id=session.id, offset=offset,
                        error=f"{type(exc).__name__}: {exc}"[:300])

    async def _still_ours(self, session_id: str, offset: int, claim: str) -> bool:
        """Renew the claim if it is still ours; whether it was."""
        return bool(await self.db.transact(
            functools.partial(_renew, session_id, offset, claim, self.clock.now()),
            durable=False))

    async def _give_back(self, session: Session, offset: int, claim: str,
                         previous: tuple[str, float]) -> None:
        """Return a claim taken over from a writer that turned out to be alive."""
        back = {"b_session": session.id, "b_offset": offset, "held": claim,
                "previous": previous[0], "previous_at": previous[1]}
        await uncancelled(self.db.transact(lambda conn: conn.execute(_GIVE_BACK, back),
                                           durable=False))

    def _touch(self, conn: sa.Connection, session_id: str, now: float) -> bool:
        done = conn.execute(_TOUCH, {"b_session": session_id, "now": now,
                                     "until": now + self.policy.ttl})
        return done.rowcount == 1

    async def _ended(self, session: Session, *, staging_gone: bool = False) -> MemvaultError:
        """The error for a chunk whose session or claim went away while it was sent.

        A chunk racing a finish learns the session is committed (a client that retried a
        chunk after finishing needs nothing more), racing an abort that it was aborted. A
        session still pending whose staging area is gone (``staging_gone``) has lost its
        bytes, unless a finish is moving them into place: it ends, expired.
        """
        if staging_gone:
            lost = await self._lost(session)
            if lost is not None:
                return lost
        where = {"b_session": session.id}
        state = await self.db.query(lambda conn: conn.execute(_STATE, where).scalar_one_or_none())
        if state == EXPIRED:
            return Expired(f"upload session {session.id} expired")
        if state is None:
            return session_not_found(session.id)
        if state != PENDING:
            return Conflict(f"upload session {session.id} is {state}", state=state)
        return Unavailable("this chunk's transfer was taken over; send it again", retry_after=1)

    async def _result(self, session: Session, index: int, *, duplicate: bool) -> PutResult:
        count, total = await self.db.query(lambda conn: _received_counts(conn, session.id))
        return PutResult(session, index, duplicate, count, total)


class _Lease:
    """A claim's lease as its transfer sees it: renewed while the body's bytes arrive (and
    once the body is in), lost when another request holds the claim."""

    def __init__(self) -> None:
        self.body: asyncio.Timeout | None = None
        """The body's deadline while it streams (cutting the transfer short moves it to now)."""
        self.lost = False
        self._seen = 0
        self._looked_at = 0

    def arrived(self, seen: int) -> None:
        self._seen = seen

    def moved(self) -> bool:
        """Whether bytes arrived since the last look, or the body is no longer streaming."""
        moved = self.body is None or self._seen != self._looked_at
        self._looked_at = self._seen
        return moved

    def cut(self) -> None:
        self.lost = True
        if self.body is not None and not self.body.expired():
            self.body.reschedule(asyncio.get_running_loop().time())


_KEEP_UP_LIMIT = 10.0
"""Longest a received chunk's answer waits for the hashing behind it, seconds."""


def _elapsed_clock() -> float:
    """Seconds for measuring a pause: counting a suspended machine's sleep too (Linux
    ``CLOCK_BOOTTIME``), which another host's lease clock went on counting."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


def _renew(session_id: str, offset: int, claim: str, now: float, conn: sa.Connection) -> bool:
    renewed = conn.execute(_RENEW, {"b_session": session_id, "b_offset": offset,
                                    "held": claim, "now": now})
    return bool(renewed.rowcount == 1)


def _received_counts(conn: sa.Connection, session_id: str) -> tuple[int, int]:
    row = conn.execute(_RECEIVED_COUNTS, {"b_session": session_id}).one()
    return int(row[0]), int(row[1])


def _too_slow(index: int, limit: float) -> RequestTimeout:
    return RequestTimeout(
        f"chunk {index} took longer than {limit:g} s to arrive; send it again",
        limit_seconds=limit, retry_after=1,
    )
