"""Uploads into capsules: the session core plus who may upload what, where, and how much.

This is where a session meets the library: begin checks the capsule and creates (or checks)
the memory in the same transaction as the session; finish's transaction attaches the blob to
the memory as an asset; abort and expiry drop a memory a begin created once no session holds
it and none filled it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from memvault import inputs
from memvault.auth import Principal
from memvault.capsules import (
    ROLES,
    CapsuleService,
    Memory,
    add_asset,
    capsule_owner,
    check_role_free,
    check_writable,
    memory_capsule,
)
from memvault.clock import Clock, iso
from memvault.errors import (
    Conflict,
    InsufficientStorage,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    ResourceExhausted,
)
from memvault.jobs.queue import enqueue
from memvault.metadata import Database
from memvault.metadata.schema import assets, capsules, memories, principals, upload_sessions
from memvault.sessions import (
    Body,
    ChunkChecksums,
    FinishItem,
    PutResult,
    Session,
    SessionService,
    SessionSpec,
)
from memvault.sessions.model import COMMITTED, PENDING, Pace, SessionPolicy
from memvault.settings import Settings
from memvault.storage.base import BlobStore, PartLimits

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
MAX_FINISH_BATCH = 16
"""Uploads one finish may commit together: an original and its derivatives, with room."""

# Built once (docs/decisions.md, "Statements built once").
_LOCK_CALLER = sa.select(principals.c.id).where(
    principals.c.id == sa.bindparam("caller")).with_for_update()
_RESERVED = sa.select(sa.func.coalesce(sa.func.sum(upload_sessions.c.size), 0)).where(
    upload_sessions.c.state == PENDING)
_PENDING_IN_CAPSULE = sa.select(
    sa.func.count(), sa.func.min(upload_sessions.c.expires_at)
).where(
    upload_sessions.c.owner == sa.bindparam("owner"),
    upload_sessions.c.idem_scope == sa.bindparam("scope"),
    upload_sessions.c.state == PENDING,
)
_MEMORY_BEGUN_BY = sa.select(memories.c.begun_by).where(memories.c.id == sa.bindparam("memory_id"))
_LOCK_MEMORY = _MEMORY_BEGUN_BY.with_for_update()
_SHARE_MEMORY = _MEMORY_BEGUN_BY.with_for_update(read=True)
_ANY_ASSET = sa.select(assets.c.role).where(
    assets.c.memory_id == sa.bindparam("memory_id")).limit(1)
_DROP_MEMORY = sa.delete(memories).where(memories.c.id == sa.bindparam("memory_id"))
_PENDING_SESSION = sa.select(upload_sessions.c.id).where(
    upload_sessions.c.id == sa.bindparam("session_id"), upload_sessions.c.state == PENDING)


def _holders(memory_id: str) -> sa.Select[tuple[str]]:
    """Pending sessions that may still fill ``memory_id``: the one whose begin created it
    (bound as ``begun_by``; it has no exclusive key) and any holding a ``memory/role``."""
    return sa.select(upload_sessions.c.id).where(
        upload_sessions.c.state == PENDING,
        sa.or_(upload_sessions.c.id == sa.bindparam("begun_by"),
               upload_sessions.c.exclusive_key.startswith(f"{memory_id}/", autoescape=True)),
    ).limit(1)


def _hold_memory(conn: sa.Connection, memory_id: str, role: str) -> None:
    """Keep ``memory_id`` from being removed by an ending session until this begin commits.

    A shared lock on its row on PostgreSQL (an end takes it exclusively first; SQLite's one
    writer serialises the two anyway). A begin that finds the row gone answers ``not_found``.
    While the session whose begin created the memory is pending, that session is the upload
    of its original, so another original into it is a ``conflict``.
    """
    row = conn.execute(_SHARE_MEMORY, {"memory_id": memory_id}).first()
    if row is None:
        raise NotFound(f"memory {memory_id} not found")
    if role != "original" or row.begun_by is None:
        return
    if conn.execute(_PENDING_SESSION, {"session_id": row.begun_by}).first() is not None:
        raise Conflict("another upload for the same target is in progress",
                       target=f"{memory_id}/original")


@dataclass(frozen=True)
class BeginRequest:
    capsule_id: str
    filename: str
    content_type: str
    size: int
    idempotency_key: str
    memory_id: str | None = None
    role: str = "original"
    sha256: str | None = None


class UploadService:
    def __init__(
        self,
        db: Database,
        store: BlobStore,
        clock: Clock,
        settings: Settings,
        capsules: CapsuleService,
    ) -> None:
        self.db = db
        self.store = store
        self.clock = clock
        self.settings = settings
        self.capsules = capsules
        self.sessions = SessionService(
            db,
            store,
            clock,
            SessionPolicy(
                ttl=settings.session_ttl,
                expired_grace=settings.expired_grace,
                chunk_timeout=settings.chunk_timeout,
                claim_lease=settings.claim_lease,
                write_batch=settings.write_batch,
                fsync=settings.fsync,
                hash_lag=settings.hash_lag,
                pace=Pace(settings.min_transfer_rate, settings.transfer_grace),
                staging_loss_is_final=settings.database_in_data_dir and not settings.s3_location,
            ),
            on_commit=self._on_commit,
            on_end=self._on_end,
        )

    # -- begin -----------------------------------------------------------------------------

    async def begin(self, caller: Principal, req: BeginRequest) -> tuple[Session, bool]:
        self._validate(req)
        chunk_size = self._chunk_size(req.size)
        # Sessions of this caller in this capsule that are past their TTL give their place
        # back now rather than at the reaper's next pass (by TTL only, one by id).
        await self.sessions.expire_overdue(caller.id, req.capsule_id)
        free = await self.store.free_bytes()
        now = self.clock.now()

        def prepare(conn: sa.Connection, session_id: str) -> dict[str, Any]:
            # Only a new session is checked against limits: a retried begin that finds its
            # pending session already holds its place.
            check_writable(conn, caller, req.capsule_id)
            # Begins of one caller take turns from here to their commit (a row lock on
            # PostgreSQL; SQLite's one writer already serialises them), so the counts and
            # sums below cannot be read by two begins that would both fit, then both insert.
            conn.execute(_LOCK_CALLER, {"caller": caller.id})
            self._check_pending_cap(conn, caller, req.capsule_id)
            self._check_headroom(conn, free, req.size)
            self._check_quotas(conn, caller.id, req.size, now)
            if req.memory_id is None:
                memory_id = self.capsules.create_memory(conn, caller, req.capsule_id,
                                                        begun_by=session_id)
            else:
                memory_id = req.memory_id
                capsule_id = memory_capsule(conn, caller, memory_id)
                if capsule_id != req.capsule_id:
                    raise NotFound(f"memory {memory_id} not found in capsule {req.capsule_id}")
                _hold_memory(conn, memory_id, req.role)
                check_role_free(conn, memory_id, req.role)
            return {"memory_id": memory_id}

        spec = SessionSpec(
            owner=caller.id,
            idem_scope=req.capsule_id,
            idem_key=req.idempotency_key,
            size=req.size,
            chunk_size=chunk_size,
            declared_sha256=req.sha256.lower() if req.sha256 else None,
            exclusive_key=f"{req.memory_id}/{req.role}" if req.memory_id else None,
            # Compared with a pending session's when the idempotency key is sent again.
            attrs={"capsule_id": req.capsule_id, "role": req.role, "filename": req.filename,
                   "content_type": req.content_type},
        )
        return await self.sessions.begin(spec, prepare)

    def _validate(self, req: BeginRequest) -> None:
        if req.role not in ROLES:
            raise InvalidArgument(f"role must be one of {', '.join(ROLES)}", role=req.role)
        if req.size < 0:
            raise InvalidArgument("size must be zero or more")
        if req.size == 0 and req.role != "original":
            # An empty file is a valid original; an empty image is never a derivative, and
            # once stored it would stand for the role (the server's job would not make it).
            raise InvalidArgument(f"a {req.role} derivative cannot be empty", role=req.role)
        if req.size > self.settings.max_upload_size:
            raise PayloadTooLarge(
                f"{req.size} bytes is more than this server accepts in one upload",
                limit=self.settings.max_upload_size,
            )
        if req.sha256 is not None and not _SHA256.fullmatch(req.sha256):
            raise InvalidArgument("sha256 must be 64 hex digits")
        inputs.name(req.idempotency_key, "idempotency_key", max_length=200)
        inputs.name(req.filename, "filename", max_length=500)
        inputs.media_type(req.content_type)

    def _chunk_size(self, size: int) -> int:
        """The configured size, grown (up to the maximum) so the chunk count stays bounded,
        within the blob store's part limits where it has them (S3: ≥ 5 MiB, ≤ 10,000)."""
        s = self.settings
        chunk, largest, most = s.chunk_size, s.max_chunk_size, s.max_chunk_count
        if isinstance(self.store, PartLimits):
            largest = min(largest, self.store.max_part_size)
            chunk = min(max(chunk, self.store.min_part_size), largest)
            most = min(most, self.store.max_parts)
        while -(-size // chunk) > most and chunk < largest:
            chunk = min(chunk * 2, largest)  # the last step may stop at the maximum
        if -(-size // chunk) > most:
            raise PayloadTooLarge(
                f"{size} bytes would need more than {most} chunks",
                limit=most * largest,
            )
        return chunk

    def _check_headroom(self, conn: sa.Connection, free: int | None, size: int) -> None:
        """``free`` was measured just before the transaction; pending sessions reserve space."""
        if free is None:
            return
        reserved = conn.execute(_RESERVED).scalar_one()
        available = free - int(reserved) - self.settings.storage_reserve
        if size > available:
            raise InsufficientStorage(
                "not enough free storage for this upload",
                limit_name="storage_headroom", needed=size, available=max(available, 0),
            )

    def _check_quotas(self, conn: sa.Connection, owner: str, size: int, now: float,
                      session: Session | None = None) -> None:
        """Daily upload and stored-bytes quotas, counting pending sessions as reservations.

        Reservations are not counters kept beside the sessions but the pending sessions
        themselves, so abort and expiry release them and finish turns them into usage without
        a separate step that could be missed. ``session`` is the one being finished: it is
        left out of the reservations and counted by its size instead.
        """
        s = self.settings
        mine = [upload_sessions.c.owner == owner]
        if session is not None:
            mine.append(upload_sessions.c.id != session.id)
        if s.daily_upload_quota is not None:
            day_start = now - now % 86400
            counts_today = session is None or session.created_at >= day_start
            begun = int(conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(upload_sessions.c.size), 0)).where(
                    *mine,
                    upload_sessions.c.state.in_((PENDING, COMMITTED)),
                    upload_sessions.c.created_at >= day_start,
                )
            ).scalar_one())
            if counts_today and begun + size > s.daily_upload_quota:
                resets = day_start + 86400
                raise ResourceExhausted(
                    f"today's upload quota is used: {begun} of {s.daily_upload_quota} bytes "
                    f"begun, this upload needs {size} more; it resets at {iso(resets)}",
                    retry_after=resets - now, limit_name="daily_upload_quota",
                    used=begun, limit=s.daily_upload_quota, requested=size,
                    resets_at=iso(resets),
                )
        if s.storage_quota is not None:
            owned = sa.select(capsules.c.id).where(capsules.c.owner_id == owner)
            stored = int(conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(assets.c.size), 0))
                .join(memories, memories.c.id == assets.c.memory_id)
                .where(memories.c.capsule_id.in_(owned))
            ).scalar_one())
            reserved = int(conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(upload_sessions.c.size), 0)).where(
                    *mine[1:], upload_sessions.c.state == PENDING,
                    upload_sessions.c.idem_scope.in_(owned),
                )
            ).scalar_one())
            if stored + reserved + size > s.storage_quota:
                raise InsufficientStorage(
                    f"storage quota reached: {stored} bytes stored and {reserved} reserved by "
                    f"pending uploads, of {s.storage_quota}; this upload needs {size} more",
                    limit_name="storage_quota", used=stored, reserved=reserved,
                    limit=s.storage_quota, requested=size,
                )

    def _check_pending_cap(self, conn: sa.Connection, caller: Principal,
                           capsule_id: str) -> None:
        limit = self.settings.max_pending_per_capsule
        row = conn.execute(_PENDING_IN_CAPSULE, {"owner": caller.id, "scope": capsule_id}).one()
        active, soonest = int(row[0]), row[1]
        if active >= limit:
            wait = max(1.0, float(soonest) - self.clock.now()) if soonest else 1.0
            raise ResourceExhausted(
                f"{active} uploads are already pending in this capsule (limit {limit}); "
                "finish or abort one, or wait for one to expire",
                retry_after=round(wait),
                limit_name="pending_sessions_per_capsule",
                active=active, limit=limit, soonest_expires_at=iso(soonest),
            )

    # -- transfer, finish, abort -----------------------------------------------------------

    async def put_chunk(
        self,
        caller: Principal,
        session_id: str,
        index: int,
        content_length: int | None,
        body: Body,
        checksums: ChunkChecksums,
    ) -> PutResult:
        return await self.sessions.put_chunk(
            session_id, caller.id, index, content_length, body, checksums
        )

    async def status(self, caller: Principal, session_id: str) -> tuple[Session, list[int], int]:
        session = await self.sessions.get(session_id, caller.id)
        received, total = await self.sessions.received(session)
        return session, received, total

    async def finish(
        self, caller: Principal, session_id: str, size: int, sha256: str
    ) -> tuple[Session, Memory]:
        [(session, memory)] = await self.finish_many(caller, [FinishItem(session_id, size, sha256)])
        return session, memory

    async def finish_many(
        self, caller: Principal, items: Sequence[FinishItem]
    ) -> list[tuple[Session, Memory]]:
        """Finish several sessions in one commit (see ``SessionService.finish_many``); each
        comes back with its memory as it reads after the commit."""
        if not 1 <= len(items) <= MAX_FINISH_BATCH:
            raise InvalidArgument(f"a finish takes 1 to {MAX_FINISH_BATCH} uploads",
                                  given=len(items))
        for item in items:
            if not _SHA256.fullmatch(item.sha256):
                raise InvalidArgument("sha256 must be 64 hex digits", upload_id=item.session_id)
        sessions = await self.sessions.finish_many(caller.id, items)
        ids = list(dict.fromkeys(s.attrs["memory_id"] for s in sessions))
        read = await asyncio.gather(*(self.capsules.get_memory(caller, m) for m in ids))
        memories = dict(zip(ids, read, strict=True))
        return [(s, memories[s.attrs["memory_id"]]) for s in sessions]

    async def abort(self, caller: Principal, session_id: str) -> None:
        await self.sessions.abort(session_id, caller.id)

    async def list_sessions(self, caller: Principal) -> list[Session]:
        return await self.sessions.list_pending(caller.id)

    # -- hooks inside the core's transactions ----------------------------------------------

    def _on_commit(self, conn: sa.Connection, session: Session) -> None:
        attrs = session.attrs
        # Re-check, inside the commit, that the owner may still write to the capsule.
        if capsule_owner(conn, attrs["capsule_id"]) != session.owner:
            raise NotFound(f"capsule {attrs['capsule_id']} not found")
        self._check_quotas(conn, session.owner, session.size, self.clock.now(), session)
        assert session.result_sha256 is not None
        if attrs["role"] == "original":
            enqueue(conn, attrs["memory_id"], self.clock.now())
        add_asset(
            conn, attrs["memory_id"], attrs["role"], session.size, session.result_sha256,
            attrs["content_type"], attrs["filename"], self.clock.now(),
        )

    def _on_end(self, conn: sa.Connection, session: Session) -> None:
        """Drop the memory this session was to fill if a begin created it and nothing else
        has filled or still holds it.

        Runs when any session ends unfinished (abort, expiry, lost staging): the one whose
        begin created the memory, or a derivative's into it; whichever ends last removes it.
        The memory's row is locked first, so two sessions ending at once (each on its own
        PostgreSQL connection) cannot each see the other still pending and both keep it.
        """
        memory_id = session.attrs["memory_id"]
        begun_by = conn.execute(_LOCK_MEMORY, {"memory_id": memory_id}).scalar()
        if begun_by is None:  # made with POST .../memories, or gone already
            return
        filled = conn.execute(_ANY_ASSET, {"memory_id": memory_id}).first()
        held = conn.execute(_holders(memory_id), {"begun_by": begun_by}).first()
        if filled is None and held is None:
            conn.execute(_DROP_MEMORY, {"memory_id": memory_id})
