"""Placing verified bytes where blobs live, so that none are left that nobody uses.

A finish (or a derivative job) moves bytes into place, then commits the rows that use them.
Between the two it can crash, be aborted, or have its commit refused; where the store keeps
one file per content (``ContentAddressed``: the local folder) those bytes are then nobody's
staging area, and nothing would ever remove them. So a blob row is *reserved* first (refcount
0, ``placed_at``; the session it is placed for notes the content), and ``collect`` deletes
the files of rows still unused ``grace`` seconds after their last placement, unless a session
they were placed for is still pending (its client may finish it tomorrow: its staging area
is empty now, the bytes are only there).

Collection never races a placement: a row is marked ``collecting`` (under its row lock, only
if unused and not placed since the cutoff) before its file is deleted, a placement that finds
it marked waits (``Unavailable``), and the row goes only after the file. Stores whose blobs
are their sealed staging areas (S3) need none of this: abort and expiry discard those.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import structlog

from memvault.clock import Clock
from memvault.errors import Unavailable
from memvault.metadata import Database
from memvault.metadata.blobs import (
    BlobBusy,
    forget_blob,
    reserve_blobs,
    start_collecting,
    unused_blobs,
)
from memvault.storage.base import BlobStore, ContentAddressed

log = structlog.get_logger("memvault.placement")

GRACE = 3600.0
"""Seconds an unused blob row is kept after its last placement: far longer than any finish
takes from placing its bytes to committing them."""


class Placements:
    def __init__(self, db: Database, store: BlobStore, clock: Clock, *,
                 grace: float = GRACE) -> None:
        self.db = db
        self.store = store
        self.clock = clock
        self.grace = grace

    @property
    def reserving(self) -> bool:
        """Whether placements are recorded (and commits must find their reservation)."""
        return isinstance(self.store, ContentAddressed)

    async def reserve(self, contents: Sequence[tuple[str, int]],
                      holders: Sequence[tuple[str, str]] = ()) -> None:
        """Record that bytes of each ``(sha256, size)`` are about to be placed, for the
        pending upload sessions ``holders`` (``(session_id, sha256)``, if any: their content
        is kept while they are pending). Call before ``BlobStore.commit``; commit the rows
        with ``record_blob(..., reserved=True)``. ``Unavailable`` if one of them is being
        deleted right now (retry in a moment)."""
        store = self.store
        if not contents or not isinstance(store, ContentAddressed):
            return
        rows = [(sha256, size, store.blob_key(sha256)) for sha256, size in contents]
        try:
            # Not durable on its own: the commit that follows syncs it; a power loss in
            # between leaves at most an unrecorded file, the case this narrows to that.
            await self.db.transact(
                functools.partial(reserve_blobs, contents=rows, now=self.clock.now(),
                                  holders=holders),
                durable=False)
        except BlobBusy as busy:
            raise Unavailable(
                "the same content is being removed from storage at this moment; "
                "retry in a second", retry_after=1, sha256=busy.sha256) from None

    async def collect(self, limit: int = 100) -> int:
        """Delete the files of blob rows unused ``grace`` seconds after their last placement
        (and finish collections a crash interrupted); returns how many."""
        store = self.store
        if not isinstance(store, ContentAddressed):
            return 0
        cutoff = self.clock.now() - self.grace
        unused = await self.db.query(
            functools.partial(unused_blobs, placed_before=cutoff, limit=limit))
        count = 0
        for sha256, storage_key in unused:
            marked = await self.db.transact(
                functools.partial(start_collecting, sha256=sha256, placed_before=cutoff))
            if not marked:
                continue  # placed or committed again since we looked
            await store.delete_blob(storage_key)
            await self.db.transact(functools.partial(forget_blob, sha256=sha256))
            log.info("blob.collected", sha256=sha256, storage_key=storage_key)
            count += 1
        return count

