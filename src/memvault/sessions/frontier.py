"""The whole-object SHA-256, advanced over the contiguous received prefix as gaps fill.

The hash state is stored with the session (``hashed_offset`` + ``hash_state``), so whichever
process receives the chunk that fills a gap continues it, and ``finish`` of a fully received
upload reads nothing back in the common case. Each byte is hashed once:

* a chunk that starts exactly at the frontier when it arrives is hashed from the bytes in hand
  (the *speculative* state, advanced while the chunk streams);
* chunks past a gap are hashed later, read back from staging (usually the page cache), by
  whichever request moves the frontier up to them. A store may be unable to read some staged
  bytes before the upload is sealed (S3: parts another process received); the frontier stops
  there, and finish seals the upload and reads the rest back.

The stored frontier only moves by compare-and-set on ``hashed_offset``; concurrent advancers in
different processes may both hash, but only one result is kept and the loser starts over from
the new frontier. Within one process a per-session lock keeps them from duplicating work.

Catching up over early chunks is done off the request path: ``kick`` starts (or re-arms) one
background advancer per session, so a chunk request does not wait while another chunk is
hashed, unless that hashing is far behind (``keep_up``, below). ``digest`` (finish) joins it,
and advances itself over anything still missing.

Chunks in flight together are chained in memory, so the catch-up overlaps the transfers
instead of following them. A chunk hashed as it streams hands its end state on as soon as its
last byte is hashed (``reached``), before its fsync and its mark; a chunk still streaming at
that offset (``expect``) *adopts* it: hashes back what it has written so far, then the rest
as it arrives. Such a chunk cannot store its state itself (the frontier is not yet at its
start, and the state it began from is not stored), so after its mark it leaves it here
(``precomputed``), keyed by the exact state it continued. When the stored frontier reaches
that chunk with that same state (byte for byte: the same prefix), ``advance`` takes the
precomputed result instead of reading the part back; any other state (the predecessor failed
and was sent again with other bytes) makes it hash the part as usual.

When chunks arrive faster than the advancer can hash them (the cores are busy with the
transfers themselves), the backlog it leaves for ``digest`` would grow with the file: 150 MiB
behind, a finish of 370 ms, for 4 GiB at 8 chunks in flight. So a chunk's answer waits
(``keep_up``) while this process's advancer is still hashing and has not come within
``hash_lag`` bytes of that chunk's end. The wait never depends on a chunk yet to come: it
ends as soon as the advancer stops, caught up or stopped by a gap.

Across processes on PostgreSQL, every move is announced (``handoff``): the process holding
the part at the new frontier hashes it, and a ``digest`` stuck behind a part held elsewhere
waits up to ``handoff_wait`` for each next move before giving up (``Behind``).
"""

from __future__ import annotations

import asyncio
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import structlog

from memvault.errors import Internal
from memvault.hashing import Sha256State, new_sha256
from memvault.metadata import Database
from memvault.metadata.schema import upload_parts, upload_sessions
from memvault.sessions.handoff import announce as announce_move
from memvault.sessions.model import PENDING
from memvault.storage.base import BlobStore, PartHolder, StagedHasher, StagedUnavailable

log = structlog.get_logger("memvault.sessions")


_PRECOMPUTED_MAX = 4096  # entries kept across sessions (a few hundred bytes each)


@dataclass(frozen=True)
class _Precomputed:
    parent: bytes
    """The stored form of the state the part's hashing continued from."""
    end: int
    state: Sha256State


class Behind(Exception):
    """The frontier stopped short of the end: the rest is readable only after ``seal``."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"hash frontier stopped at {offset}")
        self.offset = offset


class Frontier:
    def __init__(self, db: Database, store: BlobStore) -> None:
        self._db = db
        self._store = store
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._hasher = store if isinstance(store, StagedHasher) else None  # detected once
        self._holder = store if isinstance(store, PartHolder) else None
        self.announces = self._holder is not None
        """Whether moves are announced to other processes: only where a received part can be
        hashed before the seal by the process holding it alone (S3); elsewhere every process
        reads every staged byte, and nobody listens."""
        self._rearmed: set[str] = set()
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._adopters: dict[tuple[str, int], asyncio.Future[Sha256State]] = {}
        self._hashing_at: dict[str, int] = {}
        """Where each running advancer has hashed up to (saved or not)."""
        self._stepped: dict[str, asyncio.Event] = {}
        """Set (and replaced) each time an advancer hashes a part or stops."""
        self._precomputed: OrderedDict[tuple[str, int], _Precomputed] = OrderedDict()
        self.handoff_wait = 0.0
        """Seconds ``digest`` waits for another process to move the frontier (0: never);
        set when moves are being heard from other processes."""

    def moved(self, session_id: str, staging_key: str, offset: int) -> None:
        """A process (maybe this one) moved the session's frontier to ``offset``: hash the
        part there if this process holds it, and wake a ``digest`` waiting for progress."""
        for event in self._watchers.get(session_id, ()):
            event.set()
        if self._holder is not None and self._holder.holds_staged(staging_key, offset):
            self.kick(session_id)

    def expect(self, session_id: str, offset: int) -> asyncio.Future[Sha256State]:
        """A future for the hash state at ``offset``, set if a chunk of this process hashes
        its way there (``reached``); ``forget`` it when done. One transfer holds a range's
        claim at a time, so one future per range."""
        future: asyncio.Future[Sha256State] = asyncio.get_running_loop().create_future()
        self._adopters[(session_id, offset)] = future
        return future

    def forget(self, session_id: str, offset: int, future: asyncio.Future[Sha256State]) -> None:
        if self._adopters.get((session_id, offset)) is future:
            del self._adopters[(session_id, offset)]
        future.cancel()

    def reached(self, session_id: str, offset: int, state: Sha256State) -> None:
        """The hash of ``[0, offset)`` is ``state`` (stored or not): hand a copy to the chunk
        streaming there, if there is one."""
        future = self._adopters.pop((session_id, offset), None)
        if future is not None and not future.done():
            future.set_result(state.copy())

    def precomputed(self, session_id: str, offset: int, parent: bytes, end: int,
                    state: Sha256State) -> None:
        """A received part ``[offset, end)`` hashed from the state stored as ``parent`` gives
        ``state``: for ``advance`` to use once the stored frontier gets there with ``parent``."""
        key = (session_id, offset)
        self._precomputed[key] = _Precomputed(parent, end, state.copy())
        self._precomputed.move_to_end(key)
        while len(self._precomputed) > _PRECOMPUTED_MAX:
            self._precomputed.popitem(last=False)

    def _precomputed_from(self, session_id: str, offset: int, end: int,
                          state: Sha256State) -> Sha256State | None:
        """The precomputed result for part ``[offset, end)`` hashed on from ``state``, as a
        copy (kept until the frontier is stored past it), or None."""
        found = self._precomputed.get((session_id, offset))
        if found is None or found.end != end or found.parent != state.to_bytes():
            return None
        return found.state.copy()

    def _passed(self, session_id: str, offsets: list[int]) -> None:
        for offset in offsets:
            self._precomputed.pop((session_id, offset), None)

    def kick(self, session_id: str) -> None:
        """Advance in the background; one runner per session, re-armed if already running."""
        runner = self._runners.get(session_id)
        if runner is not None and not runner.done():
            self._rearmed.add(session_id)
            return
        self._runners[session_id] = asyncio.create_task(self._run(session_id))

    async def _run(self, session_id: str) -> None:
        try:
            while True:
                self._rearmed.discard(session_id)
                try:
                    await self.advance(session_id)
                except Exception:
                    # Logged, not lost: finish advances over whatever is still missing.
                    log.exception("frontier.advance_failed", session_id=session_id)
                    return
                if session_id not in self._rearmed:
                    return
        finally:
            if self._runners.get(session_id) is asyncio.current_task():
                del self._runners[session_id]
                self._hashing_at.pop(session_id, None)
                self._step(session_id, None)

    def _step(self, session_id: str, position: int | None) -> None:
        if position is not None and session_id in self._runners:
            self._hashing_at[session_id] = position  # only ever read while a runner runs
        stepped = self._stepped.pop(session_id, None)
        if stepped is not None:
            stepped.set()

    async def keep_up(self, session_id: str, target: int) -> None:
        """Wait while this process's background advancer is hashing the session and has not
        reached ``target``; return at once when none is running (caught up, or at a gap)."""
        while True:
            runner = self._runners.get(session_id)
            if runner is None or runner.done():
                return
            if self._hashing_at.get(session_id, 0) >= target:
                return
            stepped = self._stepped.setdefault(session_id, asyncio.Event())
            step = asyncio.ensure_future(stepped.wait())
            try:
                await asyncio.wait({runner, step}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                step.cancel()

    async def join(self, session_id: str) -> None:
        """Wait for the session's background advancer, if one is running."""
        runner = self._runners.get(session_id)
        if runner is not None:
            await asyncio.wait({runner})

    async def close(self) -> None:
        """Stop every background advancer (shutdown); stored progress is kept."""
        runners = list(self._runners.values())
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)

    def _lock(self, session_id: str) -> asyncio.Lock:
        lock = self._locks.get(session_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[session_id] = lock
        return lock

    async def advance(self, session_id: str) -> int:
        """Move the frontier as far as received chunks allow; returns the new offset."""
        reached = await self._advance(session_id)
        return 0 if reached is None else reached[0]

    async def _advance(self, session_id: str) -> tuple[int, Sha256State] | None:
        """``advance``, returning the frontier and the hash state there, or None if the
        session is not pending."""
        async with self._lock(session_id):
            while True:
                found = await self._db.query(lambda conn: _received_from(conn, session_id))
                if found is None:
                    return None
                row, start, state, parts = found
                position = start
                self._step(session_id, position)  # a pass that starts over starts lower
                passed: list[int] = []
                for part in parts:
                    if part.offset != position:
                        break
                    end = part.offset + part.length
                    ready = self._precomputed_from(session_id, part.offset, end, state)
                    if ready is not None:
                        state = ready  # hashed by the chunk itself, from this very state
                    else:
                        try:
                            await self._hash_staged(row.staging_key, part.offset,
                                                    part.length, state)
                        except StagedUnavailable:
                            break  # readable only once the upload is sealed (finish does)
                    passed.append(part.offset)
                    position = end
                    self._step(session_id, position)
                if position == row.hashed_offset:
                    return int(position), state
                if await self._save(session_id, row, position, state):
                    self._passed(session_id, passed)
                    self.reached(session_id, position, state)
                    return int(position), state
                # Someone else moved the frontier meanwhile: start over from theirs.

    async def _hash_staged(
        self, staging_key: str, offset: int, length: int, state: Sha256State
    ) -> None:
        if self._hasher is not None:
            await self._hasher.hash_staged(staging_key, offset, length, state)
            return
        async for piece in self._store.read_staged(staging_key, offset, length):
            await asyncio.to_thread(state.update, piece)

    async def _save(self, session_id: str, row: Any, new: int, state: Sha256State) -> bool:
        return await self._db.transact(
            lambda conn: save_frontier(conn, session_id, row.staging_key, row.size,
                                       row.hashed_offset, new, state, announce=self.announces),
            durable=False,
        )

    async def digest(self, session_id: str, size: int) -> str | None:
        """Hex SHA-256 of a fully received upload, hashing only what the frontier lacks.

        None when the session stopped being pending meanwhile (a concurrent finish or abort);
        ``Behind`` when some received bytes cannot be read before the upload is sealed and no
        other process moved the frontier over them within ``handoff_wait``.
        """
        where = {"session_id": session_id}
        moved = asyncio.Event()
        watchers = self._watchers.setdefault(session_id, set())
        watchers.add(moved)  # before looking, so no move between the look and the wait is missed
        try:
            while True:
                moved.clear()
                await self.join(session_id)
                reached = await self._advance(session_id)
                if reached is None:
                    return None
                if reached[0] == size:
                    # The common case: no second look at the row for the state it just had.
                    return reached[1].hexdigest()
                row = await self._db.query(lambda conn: conn.execute(_FRONTIER, where).first())
                if row is None or row.state != PENDING:
                    return None
                state = _restore(row.hash_state)
                if row.hashed_offset == size and state is not None:
                    return state.hexdigest()
                if row.hashed_offset > size or state is None:
                    raise Internal(
                        f"upload session {session_id}: hash frontier did not reach {size}"
                    )
                if not await _progress(moved, self.handoff_wait):
                    raise Behind(row.hashed_offset)
        finally:
            watchers.discard(moved)
            if not watchers:
                self._watchers.pop(session_id, None)


async def _progress(moved: asyncio.Event, wait: float) -> bool:
    """True if ``moved`` is set within ``wait`` seconds."""
    if wait <= 0:
        return moved.is_set()
    try:
        async with asyncio.timeout(wait):
            await moved.wait()
    except TimeoutError:
        return False
    return True


def _received_from(
    conn: sa.Connection, session_id: str
) -> tuple[Any, int, Sha256State, Sequence[Any]] | None:
    """A pending session's frontier row, where hashing starts, its state, and the received
    parts from there on; None if the session is not pending."""
    row = conn.execute(_FRONTIER_FROM, {"session_id": session_id}).first()
    if row is None or row.state != PENDING:
        return None
    start = row.hashed_offset
    state = _restore(row.hash_state)
    if state is None:
        # Unreadable state (e.g. saved by another hashing backend): start over.
        start, state = 0, new_sha256()
    parts = conn.execute(_PARTS_FROM, {"session_id": session_id, "start": start}).all()
    return row, start, state, parts


# Built once (docs/decisions.md, "Statements built once").
_FRONTIER = sa.select(
    upload_sessions.c.state, upload_sessions.c.hashed_offset, upload_sessions.c.hash_state
).where(upload_sessions.c.id == sa.bindparam("session_id"))
_FRONTIER_FROM = sa.select(
    upload_sessions.c.state,
    upload_sessions.c.staging_key,
    upload_sessions.c.size,
    upload_sessions.c.hashed_offset,
    upload_sessions.c.hash_state,
).where(upload_sessions.c.id == sa.bindparam("session_id"))
_PARTS_FROM = (
    sa.select(upload_parts.c.offset, upload_parts.c.length)
    .where(
        upload_parts.c.session_id == sa.bindparam("session_id"),
        upload_parts.c.state == "received",
        upload_parts.c.offset >= sa.bindparam("start"),
    )
    .order_by(upload_parts.c.offset)
)
_MOVE = sa.update(upload_sessions).where(
    upload_sessions.c.id == sa.bindparam("b_session"),
    upload_sessions.c.hashed_offset == sa.bindparam("b_old"),
    upload_sessions.c.state == PENDING,
).values(hashed_offset=sa.bindparam("new"), hash_state=sa.bindparam("state_bytes"))


def _restore(blob: bytes) -> Sha256State | None:
    try:
        return Sha256State.from_bytes(blob)
    except ValueError:
        return None


def save_frontier(
    conn: sa.Connection, session_id: str, staging_key: str, size: int, old: int, new: int,
    state: Sha256State, *, announce: bool,
) -> bool:
    """Move the stored frontier from ``old`` to ``new`` (compare-and-set), inside ``conn``'s
    transaction, and, if ``announce``, tell other processes (``announce_move``); False if
    someone else moved it first or the session ended."""
    done = conn.execute(_MOVE, {"b_session": session_id, "b_old": old, "new": new,
                                "state_bytes": state.to_bytes()})
    if done.rowcount != 1:
        return False
    if announce:
        announce_move(conn, session_id, staging_key, new, size)
    return True
