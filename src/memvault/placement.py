"""Placing verified bytes where blobs live, so that none are left that nobody uses.

A finish (or a derivative job) moves bytes into place, then commits the rows that use them.
Between the two it can crash, be aborted, or have its commit refused; where the store keeps
one file per content (``ContentAddressed``: the local folder) those bytes are then nobody's
staging area, and nothing would ever remove them. So a blob row is *reserved* first (refcount
0, ``placed_at``; the session it is placed for notes the content), and ``collect`` deletes
the files of rows still unused ``grace`` seconds after their last placement, unless a session
they were placed for is still pending (its client may finish it tomorrow: its staging area
is empty now, the bytes are only there).

Collection never races a placement: a collector takes a row (its own token in ``collector``,
under the row lock, only if unused, not placed since the cutoff and held by no pending
session; on PostgreSQL only ``placed_at`` and ``refcount`` are looked at again after waiting
for the lock, which is enough because a reservation always stamps ``placed_at`` in the
transaction that records the holder) before it deletes the file; a placement or commit that
finds the row taken waits (``Unavailable``), and the row goes only after the file, by the
collector that took it. Any number of reapers may collect at once: a taken row is left to its
collector, and taken over only after ``lease`` (its collector died), by a conditional update
that one of them wins.

A collector that did not die but stood still for longer than the lease (a paused VM, a hung
disk) is fenced: the store first moves the file aside, then the transaction that drops the
row runs only if this collector still holds it; if another took the row over meanwhile (and
a new finish may have placed and committed the same content since), the file is put back.
A file set aside by a collector that then crashed is put back by the store's sweep: a file
no row names is only a leak, which ``check`` (``memvault blobs check``) finds; a file a row
names that is gone would be a loss.

Stores whose blobs are their sealed staging areas (S3) need none of this: abort and expiry
discard those.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
import structlog

from memvault.aio import uncancelled
from memvault.clock import Clock
from memvault.errors import Unavailable
from memvault.hashing import Sha256State
from memvault.metadata import Database
from memvault.metadata.blobs import (
    BlobBusy,
    blob_users,
    forget_blob,
    named_blobs,
    reserve_blobs,
    start_collecting,
    stop_collecting,
    unused_blobs,
    used_blobs,
)
from memvault.metadata.schema import upload_sessions
from memvault.storage.base import BlobAudit, BlobMissing, BlobStore, ContentAddressed

log = structlog.get_logger("memvault.placement")

GRACE = 3600.0
"""Seconds an unused blob row is kept after its last placement: far longer than any finish
takes from placing its bytes to committing them."""

LEASE = 600.0
"""Seconds after which a row another collector took is presumed abandoned (that collector
died) and taken over: far longer than moving one file to the trash takes. Times are each
server's clock: servers whose clocks differ by minutes (no NTP) shorten it."""


@dataclass
class BlobCheck:
    """What ``Placements.check`` found."""

    files: int = 0
    """Blob files in the store."""
    in_use: int = 0
    """Blob rows that assets use."""
    registered: list[str] = field(default_factory=list)
    """Contents whose file no row named (left by a version before rows were reserved, or
    by a fenced collector): now reserved, so ``collect`` deletes them after ``grace``
    unless an upload uses them first."""
    missing: list[tuple[str, str, str]] = field(default_factory=list)
    """``(sha256, memory_id, role)`` of assets whose bytes are not in the store."""
    damaged: list[Damaged] = field(default_factory=list)
    """Assets whose stored bytes are another size than recorded (truncated, appended to)."""
    verified: int | None = None
    """Blobs whose bytes were read and hashed again (``verify``); None when not asked."""
    corrupt: list[Corrupt] = field(default_factory=list)
    """Assets whose stored bytes, of the right size, no longer hash to their SHA-256."""

    @property
    def intact(self) -> bool:
        """No asset lost, damaged or corrupt (files no row named are only a leak)."""
        return not (self.missing or self.damaged or self.corrupt)


@dataclass(frozen=True)
class Damaged:
    sha256: str
    memory_id: str
    role: str
    stored: int
    """Bytes in the store."""
    size: int
    """Bytes recorded (the asset's size)."""


@dataclass(frozen=True)
class Corrupt:
    sha256: str
    memory_id: str
    role: str
    found: str
    """SHA-256 of the bytes in the store."""


def _pending_digests(conn: sa.Connection) -> dict[str, str]:
    """SHA-256 → id of a pending session known to upload that content: declared at begin,
    or every byte hashed already."""
    found: dict[str, str] = {}
    for row in conn.execute(
        sa.select(upload_sessions.c.id, upload_sessions.c.size, upload_sessions.c.declared_sha256,
                  upload_sessions.c.hashed_offset, upload_sessions.c.hash_state)
        .where(upload_sessions.c.state == "pending")
    ):
        sha256 = row.declared_sha256
        if sha256 is None and row.hashed_offset == row.size and row.hash_state:
            try:
                sha256 = Sha256State.from_bytes(row.hash_state).hexdigest()
            except ValueError:
                continue
        if sha256:
            found.setdefault(sha256, row.id)
    return found


class Placements:
    def __init__(self, db: Database, store: BlobStore, clock: Clock, *,
                 grace: float = GRACE, lease: float = LEASE) -> None:
        self.db = db
        self.store = store
        self.clock = clock
        self.grace = grace
        self.lease = lease

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
            # Durable before the rename: after a power loss the session must still be seen
            # holding the content it placed, or an old unused row of the same content would
            # have its file, now the session's only copy, collected.
            await self.db.transact(
                functools.partial(reserve_blobs, contents=rows, now=self.clock.now(),
                                  holders=holders))
        except BlobBusy as busy:
            raise Unavailable(
                "the same content is being removed from storage at this moment; "
                "retry in a second", retry_after=1, sha256=busy.sha256) from None

    async def check(self, batch: int = 500, *, verify: bool = False) -> BlobCheck:
        """Compare the store with the rows, both ways (``memvault blobs check``). A file no
        row names is reserved like a placement, so the reaper collects it once unused for
        ``grace``; an asset whose file is gone, or is another size than its row records, is
        reported. With ``verify`` every blob in use of the right size is read through and
        hashed again, and one whose bytes no longer have its SHA-256 is reported. Safe while
        servers run: a finish of the same content meanwhile only stamps the row again."""
        report = BlobCheck()
        store = self.store
        if not isinstance(store, BlobAudit):
            return report
        if isinstance(store, ContentAddressed):
            await self._register_unnamed(store, report, batch)
        verified = 0
        after = ""
        while rows := await self.db.query(functools.partial(used_blobs, after=after,
                                                            limit=batch)):
            after = rows[-1][0]
            report.in_use += len(rows)
            keys = [key for _, key, _ in rows]
            sizes = await store.blob_sizes(keys)
            gone = set(await store.missing_blobs([k for k in keys if k not in sizes]))
            shas = [sha for sha, key, _ in rows if key in gone]
            if shas:
                report.missing += await self.db.query(functools.partial(blob_users,
                                                                        shas=shas))
            wrong = {sha: (sizes[key], size) for sha, key, size in rows
                     if key in sizes and sizes[key] != size}
            rehashed: dict[str, str] = {}
            for sha, key, size in rows if verify else ():
                if key not in sizes or sha in wrong:
                    continue  # reported already
                try:
                    read, digest = await store.hash_blob(key)
                except BlobMissing:
                    continue  # collected since we looked (its row is no longer in use)
                verified += 1
                if read != size:
                    wrong[sha] = (read, size)  # changed size since we looked
                elif digest != sha:
                    rehashed[sha] = digest
            if wrong:
                users = await self.db.query(functools.partial(blob_users, shas=list(wrong)))
                report.damaged += [Damaged(sha, memory, role, *wrong[sha])
                                   for sha, memory, role in users]
            if rehashed:
                users = await self.db.query(functools.partial(blob_users,
                                                              shas=list(rehashed)))
                report.corrupt += [Corrupt(sha, memory, role, rehashed[sha])
                                   for sha, memory, role in users]
        if verify:
            report.verified = verified
        return report

    async def _register_unnamed(self, store: ContentAddressed, report: BlobCheck,
                                batch: int) -> None:
        """Reserve every stored content no row names (``check``'s first half), so the reaper
        collects it once unused for ``grace``; where contents have one place (the local
        folder)."""
        # A finish from before rows were reserved may have moved a pending session's bytes
        # into place and died before its commit: its retry needs that file, so the session
        # is recorded as holding it (kept while pending), as a finish now does.
        holders = await self.db.query(_pending_digests)
        async for found in store.blob_files():
            report.files += len(found)
            for start in range(0, len(found), batch):
                part = found[start:start + batch]
                named = await self.db.query(functools.partial(
                    named_blobs, shas=[sha for sha, _ in part]))
                for sha256, size in part:
                    if sha256 in named:
                        continue
                    holder = holders.get(sha256)
                    try:
                        await self.reserve([(sha256, size)],
                                           holders=[(holder, sha256)] if holder else ())
                    except Unavailable:
                        continue  # a row appeared and is being collected: its collector's
                    report.registered.append(sha256)

    async def collect(self, limit: int = 100) -> int:
        """Delete the files of blob rows unused ``grace`` seconds after their last placement
        (and of rows whose collector died mid-way, after ``lease``); returns how many."""
        store = self.store
        if not isinstance(store, ContentAddressed):
            return 0
        token = secrets.token_hex(8)  # this collection's own: its takes are told apart
        now = self.clock.now()
        unused = await self.db.query(functools.partial(
            unused_blobs, placed_before=now - self.grace, stale_before=now - self.lease,
            limit=limit))
        count = 0
        for sha256, storage_key in unused:
            # The time of each take, not of the listing: a take stamped earlier would be
            # taken over sooner than ``lease`` after it (a long run of slow deletes).
            now = self.clock.now()
            taken = await self.db.transact(functools.partial(
                start_collecting, sha256=sha256, placed_before=now - self.grace,
                stale_before=now - self.lease, collector=token, now=now))
            if not taken:
                continue  # placed, committed or taken by another collector since we looked
            forget = functools.partial(self.db.transact, functools.partial(
                forget_blob, sha256=sha256, collector=token))
            try:
                # Whole even if cancelled (shutdown): a file moved aside is dropped or put
                # back according to what the transaction did, never left between the two.
                deleted = await uncancelled(store.delete_blob(storage_key, forget))
            except BaseException as exc:
                # The file stays (or is back); the row is given back too (also when
                # cancelled), so finishes of this content are not refused for a lease.
                await asyncio.shield(self.db.transact(
                    functools.partial(stop_collecting, sha256=sha256, collector=token)))
                if not isinstance(exc, Exception):
                    raise
                log.exception("blob.collect_failed", sha256=sha256, storage_key=storage_key)
                continue
            if deleted:
                log.info("blob.collected", sha256=sha256, storage_key=storage_key)
                count += 1
            else:
                # This collection stood still for longer than the lease: another took the
                # row over, and the content may have been placed and committed again since.
                # The file it had set aside is back (or a newer copy is there).
                log.warning("blob.collect_lease_lost", sha256=sha256, storage_key=storage_key)
        return count
