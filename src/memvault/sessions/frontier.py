"""The whole-object SHA-256, advanced over the contiguous received prefix as gaps fill.

The hash state is stored with the session (``hashed_offset`` + ``hash_state``), so whichever
process receives the chunk that fills a gap continues it, and ``finish`` of a fully received
upload reads nothing back in the common case. Each byte is hashed once:

* a chunk that starts exactly at the frontier when it arrives is hashed from the bytes in hand
  (the *speculative* state, advanced while the chunk streams);
* chunks past a gap are hashed later, read back from staging (usually the page cache), by
  whichever request moves the frontier up to them.

The stored frontier only moves by compare-and-set on ``hashed_offset``; concurrent advancers in
different processes may both hash, but only one result is kept and the loser starts over from
the new frontier. Within one process a per-session lock keeps them from duplicating work.
"""

from __future__ import annotations

import asyncio
import weakref

import sqlalchemy as sa

from memvault.errors import Internal
from memvault.hashing import Sha256State, new_sha256
from memvault.metadata import Database
from memvault.metadata.schema import upload_parts, upload_sessions
from memvault.sessions.model import PENDING, Session
from memvault.storage.base import BlobStore

Speculative = tuple[int, int, Sha256State]
"""(start, end, state after hashing [0, end)) from a chunk hashed as it streamed."""


class Frontier:
    def __init__(self, db: Database, store: BlobStore) -> None:
        self._db = db
        self._store = store
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    def _lock(self, session_id: str) -> asyncio.Lock:
        lock = self._locks.get(session_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[session_id] = lock
        return lock

    async def speculative_start(self, session: Session, offset: int) -> Sha256State | None:
        """The stored state, if a chunk at ``offset`` would extend the frontier directly."""
        if session.hashed_offset != offset:
            return None
        async with self._db.read() as conn:
            row = (
                await conn.execute(
                    sa.select(upload_sessions.c.hashed_offset, upload_sessions.c.hash_state)
                    .where(upload_sessions.c.id == session.id)
                )
            ).first()
        if row is None or row.hashed_offset != offset:
            return None
        try:
            return Sha256State.from_bytes(row.hash_state)
        except ValueError:
            return None

    async def advance(self, session_id: str, speculative: Speculative | None) -> int:
        """Move the frontier as far as received chunks allow; returns the new offset."""
        async with self._lock(session_id):
            while True:
                async with self._db.read() as conn:
                    row = (
                        await conn.execute(
                            sa.select(
                                upload_sessions.c.state,
                                upload_sessions.c.staging_key,
                                upload_sessions.c.hashed_offset,
                                upload_sessions.c.hash_state,
                            ).where(upload_sessions.c.id == session_id)
                        )
                    ).first()
                    if row is None or row.state != PENDING:
                        return 0
                    start = row.hashed_offset
                    state = _restore(row.hash_state)
                    if state is None:
                        # Unreadable state (e.g. saved by another hashing backend): start over.
                        start, state = 0, new_sha256()
                    parts = (
                        await conn.execute(
                            sa.select(upload_parts.c.offset, upload_parts.c.length)
                            .where(
                                upload_parts.c.session_id == session_id,
                                upload_parts.c.state == "received",
                                upload_parts.c.offset >= start,
                            )
                            .order_by(upload_parts.c.offset)
                        )
                    ).all()
                position = start
                for part in parts:
                    if part.offset != position:
                        break
                    end = part.offset + part.length
                    if speculative is not None and speculative[:2] == (part.offset, end):
                        state = speculative[2]
                    else:
                        await self._hash_staged(row.staging_key, part.offset, part.length, state)
                    position = end
                if position == row.hashed_offset:
                    return int(position)
                saved = await self._save(session_id, row.hashed_offset, position, state)
                if saved:
                    return int(position)
                speculative = None  # someone else moved the frontier: start from theirs

    async def _hash_staged(
        self, staging_key: str, offset: int, length: int, state: Sha256State
    ) -> None:
        async for piece in self._store.read_staged(staging_key, offset, length):
            await asyncio.to_thread(state.update, piece)

    async def _save(self, session_id: str, old: int, new: int, state: Sha256State) -> bool:
        async with self._db.unit() as uow:
            done = await uow.execute(
                sa.update(upload_sessions)
                .where(
                    upload_sessions.c.id == session_id,
                    upload_sessions.c.hashed_offset == old,
                    upload_sessions.c.state == PENDING,
                )
                .values(hashed_offset=new, hash_state=state.to_bytes())
            )
            await uow.commit()
        return done.rowcount == 1

    async def digest(self, session_id: str, size: int) -> str | None:
        """Hex SHA-256 of a fully received upload, hashing only what the frontier lacks.

        None when the session stopped being pending meanwhile (a concurrent finish or abort).
        """
        await self.advance(session_id, None)
        async with self._db.read() as conn:
            row = (
                await conn.execute(
                    sa.select(upload_sessions.c.state, upload_sessions.c.hashed_offset,
                              upload_sessions.c.hash_state)
                    .where(upload_sessions.c.id == session_id)
                )
            ).first()
        if row is None or row.state != PENDING:
            return None
        state = _restore(row.hash_state)
        if row.hashed_offset != size or state is None:
            raise Internal(f"upload session {session_id}: hash frontier did not reach {size}")
        return state.hexdigest()


def _restore(blob: bytes) -> Sha256State | None:
    try:
        return Sha256State.from_bytes(blob)
    except ValueError:
        return None
