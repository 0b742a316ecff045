"""Capsules, memories and their assets: what a caller may read, and how it is listed.

Until sharing by role arrives, a capsule's owner is its only reader and writer; to anyone else
it does not exist (``not_found``, never ``forbidden``, so ids cannot be probed).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from memvault.auth import Principal
from memvault.clock import Clock
from memvault.errors import Conflict, InvalidArgument, NotFound
from memvault.ids import new_id
from memvault.metadata import Database, UnitOfWork
from memvault.metadata.schema import assets, blobs, capsules, memories

ROLES = ("original", "display", "thumb", "placeholder")


@dataclass(frozen=True)
class Asset:
    role: str
    size: int
    sha256: str
    content_type: str
    filename: str | None
    created_at: float
    storage_key: str


@dataclass(frozen=True)
class Memory:
    id: str
    capsule_id: str
    title: str | None
    taken_at: str | None
    meta: dict[str, Any]
    created_at: float
    assets: dict[str, Asset]


@dataclass(frozen=True)
class Page:
    items: list[Memory]
    next_cursor: str | None


class CapsuleService:
    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    async def create_capsule(self, caller: Principal, name: str) -> dict[str, Any]:
        name = name.strip()
        if not name or len(name) > 200:
            raise InvalidArgument("capsule name must be 1-200 characters")
        row = {"id": new_id("cap"), "owner_id": caller.id, "name": name,
               "created_at": self.clock.now()}
        async with self.db.unit() as uow:
            taken = await uow.execute(
                sa.select(capsules.c.id).where(
                    capsules.c.owner_id == caller.id, capsules.c.name == name
                )
            )
            if taken.first() is not None:
                raise Conflict(f"you already have a capsule named {name!r}")
            await uow.execute(sa.insert(capsules).values(**row))
            await uow.commit()
        return row

    async def list_capsules(self, caller: Principal) -> list[dict[str, Any]]:
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    sa.select(capsules).where(capsules.c.owner_id == caller.id)
                    .order_by(capsules.c.created_at, capsules.c.id)
                )
            ).mappings().all()
        return [dict(r) for r in rows]

    async def writable_capsule(self, conn: AsyncConnection | UnitOfWork, caller: Principal,
                               capsule_id: str) -> None:
        """Raise ``not_found`` unless ``caller`` may write to the capsule."""
        row = (
            await conn.execute(
                sa.select(capsules.c.owner_id).where(capsules.c.id == capsule_id)
            )
        ).first()
        if row is None or row.owner_id != caller.id:
            raise NotFound(f"capsule {capsule_id} not found")

    async def create_memory(
        self,
        uow: UnitOfWork,
        caller: Principal,
        capsule_id: str,
        *,
        title: str | None = None,
        taken_at: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> str:
        await self.writable_capsule(uow, caller, capsule_id)
        memory_id = new_id("mem")
        await uow.execute(
            sa.insert(memories).values(
                id=memory_id, capsule_id=capsule_id, title=title, taken_at=taken_at,
                meta=meta or {}, created_by=caller.id, created_at=self.clock.now(),
            )
        )
        return memory_id

    async def new_memory(self, caller: Principal, capsule_id: str, **fields: Any) -> Memory:
        async with self.db.unit() as uow:
            memory_id = await self.create_memory(uow, caller, capsule_id, **fields)
            await uow.commit()
        return await self.get_memory(caller, memory_id)

    async def memory_capsule(self, conn: AsyncConnection | UnitOfWork, caller: Principal,
                             memory_id: str) -> str:
        """The capsule of a memory ``caller`` may write to, else ``not_found``."""
        row = (
            await conn.execute(
                sa.select(memories.c.capsule_id, capsules.c.owner_id)
                .join(capsules, capsules.c.id == memories.c.capsule_id)
                .where(memories.c.id == memory_id)
            )
        ).first()
        if row is None or row.owner_id != caller.id:
            raise NotFound(f"memory {memory_id} not found")
        return str(row.capsule_id)

    async def get_memory(self, caller: Principal, memory_id: str) -> Memory:
        async with self.db.read() as conn:
            await self.memory_capsule(conn, caller, memory_id)
            found = await _memories(conn, sa.and_(memories.c.id == memory_id))
        return found[0]

    async def get_asset(self, caller: Principal, memory_id: str, role: str) -> Asset:
        memory = await self.get_memory(caller, memory_id)
        asset = memory.assets.get(role)
        if asset is None:
            raise NotFound(f"memory {memory_id} has no {role!r} asset")
        return asset

    async def list_memories(
        self, caller: Principal, capsule_id: str, *, limit: int = 50, cursor: str | None = None
    ) -> Page:
        """Newest first; ``cursor`` is the opaque ``next_cursor`` of the previous page."""
        if not 1 <= limit <= 500:
            raise InvalidArgument("limit must be between 1 and 500")
        condition = memories.c.capsule_id == capsule_id
        if cursor is not None:
            created_at, last_id = _decode_cursor(cursor)
            condition = sa.and_(
                condition,
                sa.or_(
                    memories.c.created_at < created_at,
                    sa.and_(memories.c.created_at == created_at, memories.c.id < last_id),
                ),
            )
        async with self.db.read() as conn:
            await self.writable_capsule(conn, caller, capsule_id)
            items = await _memories(conn, condition, limit=limit + 1)
        more = len(items) > limit
        items = items[:limit]
        next_cursor = _encode_cursor(items[-1]) if more else None
        return Page(items, next_cursor)


async def add_asset(uow: UnitOfWork, memory_id: str, role: str, size: int, sha256: str,
                    content_type: str, filename: str | None, now: float) -> None:
    """Attach a committed blob to a memory (inside finish's transaction)."""
    await check_role_free(uow, memory_id, role)
    await uow.execute(
        sa.insert(assets).values(
            memory_id=memory_id, role=role, blob_sha256=sha256, size=size,
            content_type=content_type, filename=filename, created_at=now,
        )
    )


async def check_role_free(uow: UnitOfWork, memory_id: str, role: str) -> None:
    taken = await uow.execute(
        sa.select(assets.c.role).where(assets.c.memory_id == memory_id, assets.c.role == role)
    )
    if taken.first() is not None:
        raise Conflict(f"memory {memory_id} already has a {role!r} asset", role=role)


async def _memories(conn: AsyncConnection, condition: sa.ColumnElement[bool],
                    limit: int | None = None) -> list[Memory]:
    query = (
        sa.select(memories).where(condition)
        .order_by(memories.c.created_at.desc(), memories.c.id.desc())
    )
    if limit is not None:
        query = query.limit(limit)
    rows = (await conn.execute(query)).mappings().all()
    if not rows:
        return []
    ids = [r["id"] for r in rows]
    asset_rows = (
        await conn.execute(
            sa.select(assets, blobs.c.storage_key)
            .join(blobs, blobs.c.sha256 == assets.c.blob_sha256)
            .where(assets.c.memory_id.in_(ids))
        )
    ).mappings().all()
    by_memory: dict[str, dict[str, Asset]] = {i: {} for i in ids}
    for a in asset_rows:
        by_memory[a["memory_id"]][a["role"]] = Asset(
            role=a["role"], size=a["size"], sha256=a["blob_sha256"],
            content_type=a["content_type"], filename=a["filename"],
            created_at=a["created_at"], storage_key=a["storage_key"],
        )
    return [
        Memory(
            id=r["id"], capsule_id=r["capsule_id"], title=r["title"], taken_at=r["taken_at"],
            meta=r["meta"], created_at=r["created_at"], assets=by_memory[r["id"]],
        )
        for r in rows
    ]


def _encode_cursor(memory: Memory) -> str:
    raw = json.dumps([memory.created_at, memory.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, memory_id = json.loads(raw)
        return float(created_at), str(memory_id)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument("cursor is not one this server issued") from exc
