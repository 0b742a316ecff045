"""The session core: begin, put chunks, finish, abort, expire.

All state lives in the metadata store, so any server process can serve any request; each state
change is one short transaction (never held across network or disk I/O) whose conditional
updates make concurrent requests come out in a defined way:

* a chunk's byte range is *claimed* before a byte is written (``transfer.ChunkReceiver``), so
  two requests never write the same range at once;
* ``finish`` moves the session from ``pending`` to ``committed`` with a compare-and-set in the
  same transaction that adds the blob and lets the caller's hook add its rows; a concurrent
  or repeated finish finds it committed and returns the same result;
* abort and expiry act on one session, by id, and only when its state allows (DESIGN §3.5).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
import structlog

from memvault.clock import Clock, iso
from memvault.errors import (
    ChecksumMismatch,
    Conflict,
    Expired,
    Incomplete,
    Internal,
    InvalidArgument,
    LengthMismatch,
    MemvaultError,
    Unavailable,
)
from memvault.hashing import new_sha256
from memvault.ids import is_id, new_id
from memvault.metadata import Database
from memvault.metadata.blobs import BlobCollected, record_blob
from memvault.metadata.schema import upload_parts, upload_sessions
from memvault.placement import Placements
from memvault.sessions import frontier
from memvault.sessions.model import (
    ABORTED,
    COMMITTED,
    EXPIRED,
    PENDING,
    ChunkChecksums,
    PutResult,
    Session,
    SessionPolicy,
    SessionSpec,
    session_not_found,
)
from memvault.sessions.streaming import Body
from memvault.sessions.transfer import ChunkReceiver
from memvault.storage.base import BlobStore, LossWitness, StagedDamaged, StagingGone

log = structlog.get_logger("memvault.sessions")

CommitHook = Callable[[sa.Connection, Session], None]
"""Runs inside finish's transaction, after the blob row exists: add the caller's rows."""
EndHook = Callable[[sa.Connection, Session], None]
"""Runs inside the abort/expiry transaction: drop what the caller made for the session."""


class SessionService:
    def __init__(
        self,
        db: Database,
        store: BlobStore,
        clock: Clock,
        policy: SessionPolicy,
        *,
        on_commit: CommitHook,
        on_end: EndHook,
    ) -> None:
        self.db = db
        self.store = store
        self.clock = clock
        self.policy = policy
        self._on_commit = on_commit
        self._on_end = on_end
        self._frontier = frontier.Frontier(db, store)
        self.placements = Placements(db, store, clock)
        self._chunks = ChunkReceiver(db, store, clock, policy, self._frontier, self._lost)

    # -- begin -----------------------------------------------------------------------------

    async def begin(
        self,
        spec: SessionSpec,
        prepare: Callable[[sa.Connection, str], dict[str, Any]] | None = None,
    ) -> tuple[Session, bool]:
        """Create a session, or return the pending one with the same idempotency key.

        ``prepare(conn, session_id)`` runs in the same transaction only when a new session is
        made (e.g. to create the memory it fills, naming the session that began it) and
        returns attributes stored with the session.
        Returns ``(session, created)``.
        """
        existing = await self._find_pending(spec)
        if existing is not None:
            return existing, False
        now = self.clock.now()
        session_id = new_id("ses")
        row = {
            "id": session_id,
            "owner": spec.owner,
            "idem_scope": spec.idem_scope,
            "idem_key": spec.idem_key,
            "exclusive_key": spec.exclusive_key,
            "state": PENDING,
            "size": spec.size,
            "chunk_size": spec.chunk_size,
            "declared_sha256": spec.declared_sha256,
            "staging_key": session_id,
            "hashed_offset": 0,
            "hash_state": new_sha256().to_bytes(),
            "result_sha256": None,
            "attrs": dict(spec.attrs),
            "created_at": now,
            "last_seen": now,
            "expires_at": now + self.policy.ttl,
            "ended_at": None,
        }

        def create(conn: sa.Connection) -> Session | None:
            # Again inside the transaction: a concurrent begin may have made it meanwhile.
            found = _pending_with_key(conn, spec)
            if found is not None:
                return found
            if prepare is not None:
                row["attrs"] = {**spec.attrs, **prepare(conn, session_id)}
            if spec.exclusive_key is not None:
                holder = conn.execute(_EXCLUSIVE_HOLDER, {"key": spec.exclusive_key})
                if holder.first() is not None:
                    raise Conflict(
                        "another upload for the same target is in progress",
                        target=spec.exclusive_key,
                    )
            conn.execute(_NEW_SESSION, row)
            return None

        # Staging exists before the row that names it, so a chunk never finds a session
        # without its staging; it is removed again unless the row was committed.
        staging_key = await self.store.stage(session_id)
        row["staging_key"] = staging_key
        committed = False
        try:
            existing = await self.db.transact(create)
            committed = existing is None
        finally:
            if not committed:
                await asyncio.shield(self.store.discard(staging_key))
        if existing is not None:
            return existing, False
        session = _session(row)
        log.info("session.begin", session_id=session.id, owner=spec.owner,
                 scope=spec.idem_scope, size=spec.size,
                 chunk_size=spec.chunk_size)
        return session, True

    async def _find_pending(self, spec: SessionSpec) -> Session | None:
        """The live pending session with this idempotency key, if any.

        One past its TTL but not yet reaped is expired here (by id) so that the begin makes a
        new session instead of handing back one that would answer 410 to the next request.
        """
        existing = await self.db.query(lambda conn: _pending_with_key(conn, spec))
        if existing is not None and existing.expires_at <= self.clock.now():
            await self.expire(existing.id)
            return None
        return existing

    # -- reads -----------------------------------------------------------------------------

    async def get(self, session_id: str, owner: str) -> Session:
        """The session, if ``owner`` owns it; expired-but-unreaped sessions expire here."""
        return await self._check_live(await self._load(session_id, owner))

    async def _check_live(self, session: Session) -> Session:
        if session.state == PENDING and session.expires_at <= self.clock.now():
            # Expire it now, unless a chunk is streaming into it or it was touched or ended
            # meanwhile; either way, answer with what it is after that.
            await self.expire(session.id)
            session = await self._load(session.id, session.owner)
        if session.state != EXPIRED:
            return session
        raise Expired(f"upload session {session.id} expired", expired_at=iso(session.expires_at))

    async def received(self, session: Session) -> tuple[list[int], int]:
        """Indices of received chunks, and the bytes they hold. A committed session's
        chunk rows are gone with its staging; it holds every chunk and all its bytes."""
        if session.state == COMMITTED:
            return list(range(session.chunk_count)), session.size
        return _tally(session, await self.db.query(
            lambda conn: _received_parts(conn, session.id)))

    async def list_pending(self, owner: str | None) -> list[Session]:
        """``owner``'s live sessions, oldest first; everyone's when ``owner`` is None. One
        past its TTL is expired here, as ``get`` does, before the reaper comes (unless a
        chunk is streaming into it: then it is live, and listed)."""
        query = (
            sa.select(upload_sessions)
            .where(upload_sessions.c.state == PENDING)
            .order_by(upload_sessions.c.created_at)
        )
        if owner is not None:
            query = query.where(upload_sessions.c.owner == owner)
        rows = await self.db.query(lambda conn: conn.execute(query).mappings().all())
        now = self.clock.now()
        live = []
        for session in map(_session, rows):
            if session.expires_at <= now and await self.expire(session.id):
                continue
            live.append(session)
        return live

    # -- chunks ----------------------------------------------------------------------------

    async def put_chunk(
        self,
        session_id: str,
        owner: str,
        index: int,
        content_length: int | None,
        body: Body,
        checksums: ChunkChecksums,
    ) -> PutResult:
        """Receive chunk ``index``. Nothing is counted as received unless every check passes."""
        session = await self.get(session_id, owner)
        return await self._chunks.put(session, index, content_length, body, checksums)

    # -- finish ----------------------------------------------------------------------------

    async def finish(self, session_id: str, owner: str, size: int, sha256: str) -> Session:
        """Verify and commit. Returns the committed session (the same one on a repeat)."""
        (done,) = await self.finish_many(owner, [FinishItem(session_id, size, sha256)])
        return done

    async def finish_many(self, owner: str, items: Sequence[FinishItem]) -> list[Session]:
        """Verify several sessions, then commit them in ONE transaction: all or none.

        Every session is verified first (all chunks present, length, SHA-256); the first
        failure is raised with its ``upload_id`` and no blob has moved, so each session stays
        pending as a failed single finish leaves it. Then the blobs move into place (their
        rows reserved first: ``memvault.placement``) and one transaction commits every
        session with its caller's rows: a memory finished together with its derivatives
        appears with all of them at once. A session already committed with the same digest
        is replayed. Returns the sessions in the order given.
        """
        if len({item.session_id for item in items}) != len(items):
            raise InvalidArgument("each upload may appear once in a finish")
        checked = await asyncio.gather(*(self._check(item, owner) for item in items),
                                       return_exceptions=True)
        _raise_first(items, checked)
        verified = [c for c in checked if isinstance(c, _Verified)]
        try:
            await self.placements.reserve([(v.sha256, v.session.size) for v in verified],
                                          holders=[(v.session.id, v.sha256) for v in verified])
        except Unavailable as busy:  # that content's unused file is being deleted right now
            held = [v.session.id for v in verified if v.sha256 == busy.extra.get("sha256")]
            if held:  # (or the database is unreachable: then no upload is to blame)
                _name(busy, held[0], len(items))
            raise
        moved = await asyncio.gather(*(self._place(v) for v in verified),
                                     return_exceptions=True)
        _raise_first([i for i, c in zip(items, checked, strict=True)
                      if isinstance(c, _Verified)], moved)
        ready = [m for m in moved if isinstance(m, _Placed)]
        done = {m.id: m for m in moved if isinstance(m, Session)}
        done.update((c.id, c) for c in checked if isinstance(c, Session))
        done.update(await self._commit(ready, len(items)))
        return [done[item.session_id] for item in items]

    async def _check(self, item: FinishItem, owner: str) -> _Verified | Session:
        """Everything a finish verifies, for one session; a replay if it is committed."""
        sha256, size = item.sha256.lower(), item.size
        session, parts = await self._load_with_parts(item.session_id, owner)
        if session.state == COMMITTED:
            return self._replay(session, size, sha256)
        loaded, session = session, await self._check_live(session)
        if size != session.size:
            raise LengthMismatch(
                f"finish says {size} bytes; the session was begun for {session.size}",
                declared=session.size, given=size,
            )
        if session.declared_sha256 is not None and session.declared_sha256 != sha256:
            raise ChecksumMismatch(
                "finish gives a different SHA-256 than begin declared",
                declared=session.declared_sha256, given=sha256,
            )
        if session is loaded:
            indices, total = _tally(session, parts)
        else:  # looked at again by the TTL check: so are its parts
            indices, total = await self.received(session)
        if len(indices) != session.chunk_count or total != session.size:
            # A concurrent finish may have committed (and dropped the parts) since we loaded.
            current = await self._load(session.id, session.owner)
            if current.state == COMMITTED:
                return self._replay(current, size, sha256)
        if len(indices) != session.chunk_count:
            have = set(indices)
            missing = [i for i in range(session.chunk_count) if i not in have]
            raise Incomplete(
                f"{len(missing)} of {session.chunk_count} chunks not received",
                missing=missing[:1000], missing_count=len(missing),
            )
        if total != session.size:
            raise LengthMismatch(f"received {total} bytes, expected {session.size}",
                                 received=total, expected=session.size)
        try:
            computed = await self._verify(session, sha256)
        except (StagingGone, frontier.Behind):
            return await self._settled(session, sha256)  # aborted or expired under us
        except StagedDamaged as exc:
            return await self._damaged(session, sha256, exc)
        if computed is None:
            return await self._settled(session, sha256)
        return _Verified(session, computed)

    async def _place(self, verified: _Verified) -> _Placed | Session:
        """Move the verified bytes to their content address (durably)."""
        session, sha256 = verified.session, verified.sha256
        try:
            key = await self.store.commit(session.staging_key, sha256, session.size)
        except (StagingGone, frontier.Behind):
            # Aborted or expired under us; or, if still pending, its bytes are gone.
            return await self._settled(session, sha256, placing=True)
        except StagedDamaged as exc:
            return await self._damaged(session, sha256, exc, placing=True)
        return _Placed(session, sha256, key)

    async def _damaged(self, session: Session, sha256: str, exc: StagedDamaged, *,
                       placing: bool = False) -> Session:
        """A session whose staged bytes were damaged from outside (its staging file cut
        short): every finish would fail the same way until the TTL, and the chunks cannot be
        sent again (the server counts them received). End it, lost, so its client begins
        again; if something else ended it first, that outcome."""
        log.error("session.staging_damaged", session_id=session.id, owner=session.owner,
                  scope=session.idem_scope, why=exc.why)
        if await self._end(session, EXPIRED, lost=True, placing=placing):
            raise Expired(f"upload session {session.id}: its uploaded bytes were damaged on "
                          f"the server ({exc.why}); begin the upload again", lost=True)
        return await self._settled(session, sha256, placing=placing)

    async def _verify(self, session: Session, sha256: str) -> str | None:
        """The upload's SHA-256, checked against ``sha256``, with its staged bytes sealed;
        None if the session stopped being pending meanwhile."""
        sealed = False
        try:
            computed = await self._frontier.digest(session.id, session.size)
        except frontier.Behind as behind:
            # Some received bytes are readable only once the upload is whole (S3 parts that
            # another process received): seal it, then hash the rest from the sealed object.
            log.info("session.read_back", session_id=session.id, offset=behind.offset,
                     length=session.size - behind.offset)
            await self._seal(session)
            sealed = True
            computed = await self._frontier.digest(session.id, session.size)
        if computed is None:
            return None
        if computed != sha256:
            # The session stays pending (sealed or not): a finish with the right digest,
            # or an abort, settles it.
            raise ChecksumMismatch(
                "the uploaded bytes do not have the SHA-256 given to finish: if that "
                "digest is right, some received chunk holds other bytes (which one cannot "
                "be told, and a received chunk is never overwritten): abort and begin again",
                expected=sha256, computed=computed,
            )
        if not sealed:
            await self._seal(session)
        return computed

    async def _seal(self, session: Session) -> None:
        """Hand the store every received part's receipt, in order, to make the bytes whole."""
        where = {"session_id": session.id}
        receipts = await self.db.query(
            lambda conn: conn.execute(_RECEIPTS, where).scalars().all())
        if len(receipts) != session.chunk_count:
            raise StagingGone(session.staging_key)  # committed or ended since the check
        await self.store.seal(session.staging_key, session.size, receipts)

    async def _settled(self, session: Session, sha256: str, *, placing: bool = False) -> Session:
        """The outcome of a session another request ended while this finish was running,
        or whose staged bytes are gone (``placing``: this finish placed them, if anyone)."""
        current = await self._load(session.id, session.owner)
        if current.state == COMMITTED:
            return self._replay(current, session.size, sha256)
        if current.state == PENDING:
            lost = await self._lost(current, placing=placing)
            if lost is not None:
                raise lost
            raise Internal(f"upload session {session.id}: staged bytes are gone or unreadable")
        raise Expired(f"upload session {session.id} ended before finish completed")

    async def _lost(self, session: Session, *, placing: bool = False) -> MemvaultError | None:
        """A pending session whose staging area is gone (the data folder was restored from
        a backup, or something removed the file) can never finish: end it as expired, so
        its client begins again instead of being told to retry for ever. Only in the local
        folder, where a staging file is gone for good once no finish has placed it
        (``placed_sha256``: a finish moves it into ``blobs/`` right now, unless ``placing``,
        when this finish did and the blob is gone too). None if it is not ended.

        And only where the database lives in that same folder (``policy.staging_loss_is_final``,
        the embedded default): with the database elsewhere, a folder that is not mounted, or
        another process's, looks just the same, and its sessions are not lost (a review
        found this), or where the store itself witnesses the loss (``LossWitness``: S3, whose
        multipart upload is gone and was not completed into its object, so a finish that
        sealed it and has yet to commit is never mistaken for a loss). Even there, only
        while the store itself is in place: a data folder moved or unmounted for a moment
        (SQLite writes on through its open file) is ``Unavailable``, and its sessions live
        on (a failure review lost every session touched while the folder was away)."""
        if self.policy.staging_loss_is_final:
            try:
                await self.store.check()
            except OSError as exc:
                log.warning("session.store_missing", session_id=session.id,
                            error=f"{exc.strerror or exc}: {exc.filename or ''}")
                return Unavailable("the server's storage folder is not in place; try again "
                                   "shortly", retry_after=5)
        if not self.policy.staging_loss_is_final and not (
                isinstance(self.store, LossWitness)
                and await self.store.staging_lost(session.staging_key)):
            return None
        if not await self._end(session, EXPIRED, lost=True, placing=placing):
            return None
        log.warning("session.staging_lost", session_id=session.id, owner=session.owner,
                    scope=session.idem_scope)
        return Expired(f"upload session {session.id}: its uploaded bytes are gone from the "
                       "server (restored from a backup?); begin the upload again",
                       lost=True)

    def _replay(self, session: Session, size: int, sha256: str) -> Session:
        if session.result_sha256 != sha256 or session.size != size:
            what = "size" if session.size != size else "SHA-256"
            raise Conflict(
                f"upload session was already committed with a different {what}",
                sha256=session.result_sha256, size=session.size,
            )
        return session

    async def _commit(self, placed: list[_Placed], batch: int) -> dict[str, Session]:
        """One transaction that commits every placed session, or none of them. A session
        that a concurrent finish or an abort ended meanwhile rolls the transaction back; it
        is settled on its own and the transaction is run again without it."""
        done: dict[str, Session] = {}
        while placed:
            now = self.clock.now()
            try:
                kept = await self.db.transact(
                    functools.partial(self._commit_all, placed, now, batch))
            except _Lost as lost:
                try:
                    done[lost.placed.session.id] = await self._settled(lost.placed.session,
                                                                       lost.placed.sha256)
                except MemvaultError as exc:
                    _name(exc, lost.placed.session.id, batch)
                    raise
                placed = [p for p in placed if p is not lost.placed]
                continue
            except BlobCollected as gone:
                # Not expected: a pending session holds the content it placed, so no
                # collector takes it; seen only if something deleted the row regardless.
                error = Internal("the bytes placed for this upload were removed before it "
                                 "was committed; upload the file again", sha256=gone.sha256)
                _name(error, next(p.session.id for p in placed if p.sha256 == gone.sha256),
                      batch)
                raise error from None
            for p, key in zip(placed, kept, strict=True):
                done[p.session.id] = p.committed(now)
                log.info("session.finish", session_id=p.session.id, owner=p.session.owner,
                         scope=p.session.idem_scope, size=p.session.size, sha256=p.sha256,
                         batch=batch)
                if key != p.storage_key:
                    # The same content was stored before under another key (a store that
                    # does not address by content): the bytes just committed are a second
                    # copy. Dropped only now, so a crash before this leaks an object and
                    # never loses one.
                    await self.store.discard(p.session.staging_key)
            break
        return done

    def _commit_all(self, placed: list[_Placed], now: float, batch: int,
                    conn: sa.Connection) -> list[str]:
        """Inside the transaction: every session pending → committed, then every blob row,
        then each session's parts dropped and its caller's rows added, in the order given.
        Rows are locked in one order whatever the caller's (sessions by id, then blobs by
        SHA-256), so two finishes over overlapping sessions or crossed contents cannot
        deadlock each other on PostgreSQL. Returns the storage key each blob is kept under,
        in the order given."""
        for p in sorted(placed, key=lambda p: p.session.id):
            won = conn.execute(_COMMIT_SESSION,
                               {"b_session": p.session.id, "content": p.sha256, "now": now})
            if won.rowcount != 1:
                raise _Lost(p)  # a concurrent finish or an abort got there first
        reserved = self.placements.reserving
        kept = {p.session.id: record_blob(conn, p.sha256, p.session.size, p.storage_key, now,
                                          reserved=reserved)
                for p in sorted(placed, key=lambda p: (p.sha256, p.session.id))}
        for p in placed:
            conn.execute(_DROP_PARTS, {"b_session": p.session.id})
            try:
                self._on_commit(conn, p.committed(now))
            except MemvaultError as exc:
                _name(exc, p.session.id, batch)
                raise
        return [kept[p.session.id] for p in placed]

    @property
    def hash_frontier(self) -> frontier.Frontier:
        return self._frontier

    async def join_hashing(self, session_id: str) -> None:
        """Wait until background hashing of the session's received chunks has caught up."""
        await self._frontier.join(session_id)

    async def close(self) -> None:
        """Stop background work (at shutdown); nothing stored is lost."""
        await self._frontier.close()

    # -- abort and expiry ------------------------------------------------------------------

    async def abort(self, session_id: str, owner: str) -> None:
        session = await self._load(session_id, owner)
        if session.state == COMMITTED:
            raise Conflict(f"upload session {session_id} is already committed", state=COMMITTED)
        session = await self._check_live(session)
        if await self._end(session, ABORTED):
            log.info("session.abort", session_id=session.id, owner=owner,
                     scope=session.idem_scope)
            return
        # Not pending any more by our transaction: what ended it decides the answer (a 204
        # had told a caller "aborted" while a finish on another server had stored the file).
        row = await self.db.query(lambda conn: _session_row(conn, session_id))
        state = row["state"] if row is not None else None
        if state == COMMITTED:
            raise Conflict(f"upload session {session_id} was committed by a finish that "
                           "came first", state=COMMITTED)
        if state == EXPIRED:
            raise Expired(f"upload session {session_id} expired")

    async def expire(self, session_id: str) -> bool:
        """Expire one session if, and only if, it is pending past its ``expires_at``."""
        row = await self.db.query(lambda conn: _session_row(conn, session_id))
        if row is None:
            return False
        session = _session(row)
        if session.state != PENDING or session.expires_at > self.clock.now():
            return False
        ended = await self._end(session, EXPIRED)
        if ended:
            log.info("session.expire", session_id=session.id, owner=session.owner,
                     scope=session.idem_scope,
                     last_seen=session.last_seen)
        return ended

    async def expire_due(self, limit: int = 100) -> int:
        """Expire sessions past their TTL, one by id at a time; returns how many."""
        count = await self._expire_overdue(_OVERDUE, {"limit": limit})
        await self._purge_ended(self.clock.now())
        return count

    async def expire_overdue(self, owner: str, idem_scope: str) -> int:
        """Expire ``owner``'s sessions in one scope that are past their TTL."""
        return await self._expire_overdue(
            _OVERDUE_IN_SCOPE, {"owner": owner, "scope": idem_scope, "limit": 100})

    async def _expire_overdue(self, query: sa.Select[str],
                              params: dict[str, Any]) -> int:
        """Expire pending sessions past their TTL that ``query`` finds, one by id, each
        re-checked in its own transaction (so an active one is never touched)."""
        params = {**params, "now": self.clock.now()}
        ids = await self.db.query(lambda conn: conn.execute(query, params).scalars().all())
        count = 0
        for session_id in ids:
            count += await self.expire(session_id)
        return count

    async def _end(self, session: Session, state: str, *, lost: bool = False,
                   placing: bool = False) -> bool:
        now = self.clock.now()
        ended = dataclasses.replace(session, state=state, ended_at=now)

        def end(conn: sa.Connection) -> bool:
            condition = [upload_sessions.c.id == session.id, upload_sessions.c.state == PENDING]
            if lost:
                if not placing:
                    condition.append(upload_sessions.c.placed_sha256.is_(None))
            elif state == EXPIRED:
                # Re-checked inside the transaction: activity since we looked saves it.
                condition.append(upload_sessions.c.expires_at <= now)
                busy = conn.execute(
                    sa.select(upload_parts.c.offset).where(
                        upload_parts.c.session_id == session.id,
                        upload_parts.c.state == "writing",
                        upload_parts.c.claimed_at > now - self.policy.claim_lease,
                    ).limit(1)
                )
                if busy.first() is not None:
                    return False  # mid-chunk: never expired under a transfer
            done = conn.execute(
                sa.update(upload_sessions).where(*condition)
                .values(state=state, ended_at=now, exclusive_key=None, hash_state=b"",
                        placed_sha256=None)
            )
            if done.rowcount != 1:
                return False
            conn.execute(_DROP_PARTS, {"b_session": session.id})
            if state == ABORTED:
                conn.execute(sa.delete(upload_sessions).where(upload_sessions.c.id == session.id))
            self._on_end(conn, ended)
            return True

        if not await self.db.transact(end):
            return False
        try:
            await self.store.discard(session.staging_key)
        except Exception:  # the session has ended all the same; only its bytes are left
            # No pending session owns that staging area any more: the reaper's staging
            # sweep removes it within the hour. Failing here would tell the client to
            # retry an abort whose retry can only be a 404.
            log.warning("session.discard_failed", session_id=session.id, exc_info=True)
        return True

    async def sweep_staging(self, grace: float = 3600.0) -> int:
        """Remove staging areas that no pending session owns and nobody has written to for
        ``grace`` seconds: left by a begin whose transaction never committed, or by a crash
        between storing derivative bytes and recording them. Returns how many."""
        # File ages are wall-clock time, whatever clock the sessions run on.
        keys = await self.store.staged_keys(time.time() - grace)

        def owned(conn: sa.Connection) -> set[str]:
            # Committed sessions count as owners too: where a blob is its sealed staging
            # area (S3), a sweep that listed the area just before finish sealed it must not
            # take it away. Aborted, expired and unknown ones can never commit any more.
            found: set[str] = set()
            for start in range(0, len(keys), 500):
                found.update(conn.execute(
                    sa.select(upload_sessions.c.staging_key).where(
                        upload_sessions.c.state.in_((PENDING, COMMITTED)),
                        upload_sessions.c.staging_key.in_(keys[start:start + 500]))
                ).scalars())
            return found

        kept = await self.db.query(owned) if keys else set()
        orphans = [k for k in keys if k not in kept]
        for key in orphans:
            await self.store.discard(key)
            log.info("staging.swept", staging_key=key)
        return len(orphans)

    async def _purge_ended(self, now: float) -> None:
        """Forget expired sessions after the grace period (they answer 404 from then on)."""
        purge = sa.delete(upload_sessions).where(
            upload_sessions.c.state == EXPIRED,
            upload_sessions.c.ended_at < now - self.policy.expired_grace,
        )
        await self.db.transact(lambda conn: conn.execute(purge))

    async def _load(self, session_id: str, owner: str) -> Session:
        row = await self.db.query(lambda conn: _session_row(conn, session_id))
        if row is None or row["owner"] != owner:
            raise session_not_found(session_id)
        return _session(row)

    async def _load_with_parts(self, session_id: str,
                               owner: str) -> tuple[Session, Sequence[sa.Row[int, int]]]:
        """``_load`` and the session's received parts, in one round trip."""
        def read(conn: sa.Connection) -> tuple[sa.RowMapping | None, Sequence[sa.Row[int, int]]]:
            row = _session_row(conn, session_id)
            return row, (_received_parts(conn, session_id) if row is not None else [])

        row, parts = await self.db.query(read)
        if row is None or row["owner"] != owner:
            raise session_not_found(session_id)
        return _session(row), parts


# Built once (docs/decisions.md, "Statements built once"); ``b_`` parameters, never named
# like a column, where an update would otherwise set that column from them.
_SESSION = sa.select(upload_sessions).where(upload_sessions.c.id == sa.bindparam("session_id"))
_PENDING_WITH_KEY = sa.select(upload_sessions).where(
    upload_sessions.c.owner == sa.bindparam("owner"),
    upload_sessions.c.idem_scope == sa.bindparam("scope"),
    upload_sessions.c.idem_key == sa.bindparam("key"),
    upload_sessions.c.state == PENDING,
)
_EXCLUSIVE_HOLDER = sa.select(upload_sessions.c.id).where(
    upload_sessions.c.exclusive_key == sa.bindparam("key"))
_NEW_SESSION = sa.insert(upload_sessions)
_OVERDUE = sa.select(upload_sessions.c.id).where(
    upload_sessions.c.state == PENDING, upload_sessions.c.expires_at <= sa.bindparam("now")
).limit(sa.bindparam("limit", type_=sa.Integer))
_OVERDUE_IN_SCOPE = _OVERDUE.where(upload_sessions.c.owner == sa.bindparam("owner"),
                                   upload_sessions.c.idem_scope == sa.bindparam("scope"))
_RECEIPTS = (
    sa.select(upload_parts.c.receipt)
    .where(upload_parts.c.session_id == sa.bindparam("session_id"),
           upload_parts.c.state == "received")
    .order_by(upload_parts.c.offset)
)
_COMMIT_SESSION = sa.update(upload_sessions).where(
    upload_sessions.c.id == sa.bindparam("b_session"), upload_sessions.c.state == PENDING
).values(state=COMMITTED, result_sha256=sa.bindparam("content"), ended_at=sa.bindparam("now"),
         exclusive_key=None, hash_state=b"", placed_sha256=None)
_DROP_PARTS = sa.delete(upload_parts).where(upload_parts.c.session_id == sa.bindparam("b_session"))
_RECEIVED_PARTS = (
    sa.select(upload_parts.c.offset, upload_parts.c.length)
    .where(upload_parts.c.session_id == sa.bindparam("session_id"),
           upload_parts.c.state == "received")
    .order_by(upload_parts.c.offset)
)


def _session_row(conn: sa.Connection, session_id: str) -> sa.RowMapping | None:
    if not is_id(session_id, "ses"):
        return None
    return conn.execute(_SESSION, {"session_id": session_id}).mappings().first()


def _received_parts(conn: sa.Connection, session_id: str) -> Sequence[sa.Row[int, int]]:
    return conn.execute(_RECEIVED_PARTS, {"session_id": session_id}).all()


def _tally(session: Session, parts: Sequence[Any]) -> tuple[list[int], int]:
    """Indices of the received ``parts`` (offset, length), and the bytes they hold."""
    return [p.offset // session.chunk_size for p in parts], sum(p.length for p in parts)


def _pending_with_key(conn: sa.Connection, spec: SessionSpec) -> Session | None:
    row = conn.execute(_PENDING_WITH_KEY, {
        "owner": spec.owner, "scope": spec.idem_scope, "key": spec.idem_key,
    }).mappings().first()
    if row is None:
        return None
    existing = _session(row)
    asked = {"size": spec.size, "sha256": spec.declared_sha256, "target": spec.exclusive_key,
             **spec.attrs}
    held = {"size": existing.size, "sha256": existing.declared_sha256,
            "target": row["exclusive_key"], **{k: existing.attrs.get(k) for k in spec.attrs}}
    differs = sorted(k for k in asked if asked[k] != held[k])
    if differs:
        raise Conflict(
            f"idempotency key reused for a different upload ({', '.join(differs)} "
            "differ from the pending session's); use a new key for a new upload",
            session_id=existing.id, differs=differs,
        )
    return existing


_FIELDS = tuple(Session.__dataclass_fields__)


def _session(row: Any) -> Session:
    return Session(**{name: row[name] for name in _FIELDS})


@dataclasses.dataclass(frozen=True)
class FinishItem:
    """One session to finish, with the length and SHA-256 its client computed."""

    session_id: str
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class _Verified:
    session: Session
    sha256: str


@dataclasses.dataclass(frozen=True)
class _Placed:
    session: Session
    sha256: str
    storage_key: str

    def committed(self, now: float) -> Session:
        return dataclasses.replace(self.session, state=COMMITTED, result_sha256=self.sha256,
                                   ended_at=now)


class _Lost(Exception):
    """Raised inside the commit transaction to roll it back: ``placed`` was ended under us."""

    def __init__(self, placed: _Placed) -> None:
        super().__init__(placed.session.id)
        self.placed = placed


def _raise_first(items: Sequence[FinishItem], outcomes: Sequence[object]) -> None:
    """Raise the first failure among ``outcomes``, naming its upload when there are several."""
    for item, outcome in zip(items, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            if isinstance(outcome, MemvaultError):
                _name(outcome, item.session_id, len(items))
            raise outcome


def _name(error: MemvaultError, session_id: str, batch: int) -> None:
    """In a finish of several sessions, say which one ``error`` is about."""
    if batch > 1:
        error.extra.setdefault("upload_id", session_id)
