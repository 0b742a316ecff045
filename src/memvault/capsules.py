"""Capsules, memories and their assets: what a caller may read, and how it is listed.

Until sharing by role arrives, a capsule's owner is its only reader and writer; to anyone else
it does not exist (``not_found``, never ``forbidden``, so ids cannot be probed).
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from memvault import inputs
from memvault.auth import Principal
from memvault.clock import Clock
from memvault.errors import Conflict, InvalidArgument, NotFound
from memvault.ids import is_id, new_id
from memvault.metadata import Database
from memvault.metadata.schema import assets, blobs, capsules, derivative_jobs, memories

ROLES = ("original", "display", "thumb", "placeholder")
DERIVED_ROLES = ROLES[1:]
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")

# Built once (docs/decisions.md, "Statements built once").
_CAPSULE_OWNER = sa.select(capsules.c.owner_id).where(
    capsules.c.id == sa.bindparam("capsule_id"))
_MEMORY_CAPSULE = (
    sa.select(memories.c.capsule_id, capsules.c.owner_id)
    .join(capsules, capsules.c.id == memories.c.capsule_id)
    .where(memories.c.id == sa.bindparam("memory_id"))
)
_NEW_MEMORY = sa.insert(memories)
_NEW_ASSET = sa.insert(assets)
_ROLE_TAKEN = sa.select(assets.c.role).where(assets.c.memory_id == sa.bindparam("memory_id"),
                                             assets.c.role == sa.bindparam("role"))
_MEMORY_ROWS = (
    sa.select(memories, derivative_jobs.c.state.label("job_state"),
              derivative_jobs.c.reason.label("job_reason"))
    .outerjoin(derivative_jobs, derivative_jobs.c.memory_id == memories.c.id)
    .order_by(memories.c.created_at.desc(), memories.c.id.desc())
)
"""Memories with their derivative job's state, newest first; narrowed with ``where``."""
_ONE_MEMORY = _MEMORY_ROWS.where(memories.c.id == sa.bindparam("memory_id"))
_ASSETS_OF = (
    sa.select(assets, blobs.c.storage_key)
    .join(blobs, blobs.c.sha256 == assets.c.blob_sha256)
    .where(assets.c.memory_id.in_(sa.bindparam("ids", expanding=True)))
)


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
    thumbhash: str | None = None
    derivatives: dict[str, str] = field(default_factory=dict)
    derivatives_reason: str | None = None


@dataclass(frozen=True)
class Page:
    items: list[Memory]
    next_cursor: str | None


class CapsuleService:
    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    async def create_capsule(self, caller: Principal, name: str) -> dict[str, Any]:
        name = inputs.text(name.strip(), "capsule name", max_length=200)
        row = {"id": new_id("cap"), "owner_id": caller.id, "name": name,
               "created_at": self.clock.now()}

        def create(conn: sa.Connection) -> None:
            taken = conn.execute(
                sa.select(capsules.c.id).where(
                    capsules.c.owner_id == caller.id, capsules.c.name == name
                )
            )
            if taken.first() is not None:
                raise Conflict(f"you already have a capsule named {name!r}")
            conn.execute(sa.insert(capsules).values(**row))

        await self.db.transact(create)
        return row

    async def list_capsules(self, caller: Principal) -> list[dict[str, Any]]:
        query = (
            sa.select(capsules).where(capsules.c.owner_id == caller.id)
            .order_by(capsules.c.created_at, capsules.c.id)
        )
        rows = await self.db.query(lambda conn: conn.execute(query).mappings().all())
        return [dict(r) for r in rows]

    def create_memory(
        self,
        conn: sa.Connection,
        caller: Principal,
        capsule_id: str,
        *,
        title: str | None = None,
        taken_at: str | None = None,
        meta: dict[str, Any] | None = None,
        begun_by: str | None = None,
    ) -> str:
        """Insert a memory into a capsule ``caller`` may write to (inside a transaction).

        ``begun_by`` names the upload session whose begin creates it (see ``memories``).
        """
        fields = _memory_fields({"title": title, "taken_at": taken_at, "meta": meta or {}})
        check_writable(conn, caller, capsule_id)
        memory_id = new_id("mem")
        conn.execute(_NEW_MEMORY, {
            "id": memory_id, "capsule_id": capsule_id, **fields,
            "created_by": caller.id, "created_at": self.clock.now(), "begun_by": begun_by,
        })
        return memory_id

    async def new_memory(self, caller: Principal, capsule_id: str, **fields: Any) -> Memory:
        memory_id = await self.db.transact(
            lambda conn: self.create_memory(conn, caller, capsule_id, **fields)
        )
        return await self.get_memory(caller, memory_id)

    async def get_memory(self, caller: Principal, memory_id: str) -> Memory:
        def read(conn: sa.Connection) -> Memory:
            memory_capsule(conn, caller, memory_id)
            return _memories(conn, _ONE_MEMORY, {"memory_id": memory_id})[0]

        return await self.db.query(read)

    async def get_asset(self, caller: Principal, memory_id: str, role: str) -> Asset:
        memory = await self.get_memory(caller, memory_id)
        asset = memory.assets.get(role)
        if asset is None:
            raise NotFound(f"memory {memory_id} has no {role!r} asset")
        return asset

    async def update_memory(self, caller: Principal, memory_id: str,
                            fields: dict[str, Any]) -> Memory:
        """Set the given fields (``title``, ``taken_at``, ``meta``, ``thumbhash``) of a memory
        ``caller`` may write to; fields not given keep their values."""
        fields = _memory_fields(fields)

        def update(conn: sa.Connection) -> None:
            memory_capsule(conn, caller, memory_id)
            if fields:
                conn.execute(
                    sa.update(memories).where(memories.c.id == memory_id).values(**fields)
                )

        await self.db.transact(update)
        return await self.get_memory(caller, memory_id)

    async def list_memories(
        self, caller: Principal, capsule_id: str, *, limit: int = 50, cursor: str | None = None,
        sha256: str | None = None,
    ) -> Page:
        """Newest first; ``cursor`` is the opaque ``next_cursor`` of the previous page.

        With ``sha256``, only memories whose original has that digest (a client's "is this
        file already here?" before it uploads).
        """
        if not 1 <= limit <= 500:
            raise InvalidArgument("limit must be between 1 and 500")
        condition = memories.c.capsule_id == capsule_id
        if sha256 is not None:
            if not _SHA256.fullmatch(sha256):
                raise InvalidArgument("sha256 must be 64 hex digits")
            condition = sa.and_(condition, memories.c.id.in_(
                sa.select(assets.c.memory_id).where(assets.c.role == ROLES[0],
                                                     assets.c.blob_sha256 == sha256.lower())
            ))
        if cursor is not None:
            created_at, last_id = _decode_cursor(cursor)
            condition = sa.and_(
                condition,
                sa.or_(
                    memories.c.created_at < created_at,
                    sa.and_(memories.c.created_at == created_at, memories.c.id < last_id),
                ),
            )

        def read(conn: sa.Connection) -> list[Memory]:
            check_writable(conn, caller, capsule_id)
            return _memories(conn, _MEMORY_ROWS.where(condition).limit(limit + 1), {})

        items = await self.db.query(read)
        more = len(items) > limit
        items = items[:limit]
        next_cursor = _encode_cursor(items[-1]) if more else None
        return Page(items, next_cursor)


# -- checks and writes that run inside a caller's transaction ------------------------------


def check_writable(conn: sa.Connection, caller: Principal, capsule_id: str) -> None:
    """Raise ``not_found`` unless ``caller`` may write to the capsule."""
    if capsule_owner(conn, capsule_id) != caller.id:
        raise NotFound(f"capsule {capsule_id} not found")


def capsule_owner(conn: sa.Connection, capsule_id: str) -> str | None:
    """The capsule's owner; None if there is no such capsule."""
    if not is_id(capsule_id, "cap"):
        return None
    owner = conn.execute(_CAPSULE_OWNER, {"capsule_id": capsule_id}).scalar_one_or_none()
    return None if owner is None else str(owner)


def memory_capsule(conn: sa.Connection, caller: Principal, memory_id: str) -> str:
    """The capsule of a memory ``caller`` may write to, else ``not_found``."""
    row = (conn.execute(_MEMORY_CAPSULE, {"memory_id": memory_id}).first()
           if is_id(memory_id, "mem") else None)
    if row is None or row.owner_id != caller.id:
        raise NotFound(f"memory {memory_id} not found")
    return str(row.capsule_id)


def add_asset(conn: sa.Connection, memory_id: str, role: str, size: int, sha256: str,
              content_type: str, filename: str | None, now: float) -> None:
    """Attach a committed blob to a memory (inside finish's transaction)."""
    check_role_free(conn, memory_id, role)
    conn.execute(_NEW_ASSET, {
        "memory_id": memory_id, "role": role, "blob_sha256": sha256, "size": size,
        "content_type": content_type, "filename": filename, "created_at": now,
    })


def check_role_free(conn: sa.Connection, memory_id: str, role: str) -> None:
    taken = conn.execute(_ROLE_TAKEN, {"memory_id": memory_id, "role": role})
    if taken.first() is not None:
        raise Conflict(f"memory {memory_id} already has a {role!r} asset", role=role)


def _memories(conn: sa.Connection, query: sa.Select[Any], params: dict[str, Any]) -> list[Memory]:
    """The memories ``query`` (``_MEMORY_ROWS`` narrowed) finds, with their assets."""
    rows = conn.execute(query, params).mappings().all()
    if not rows:
        return []
    ids = [r["id"] for r in rows]
    asset_rows = conn.execute(_ASSETS_OF, {"ids": ids}).mappings().all()
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
            thumbhash=r["thumbhash"],
            derivatives=_derivative_status(by_memory[r["id"]], r["job_state"]),
            derivatives_reason=r["job_reason"] if r["job_state"] in ("failed", "unsupported")
            else None,
        )
        for r in rows
    ]


def _memory_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` of a memory as given, once each is checked (``inputs``)."""
    unknown = set(fields) - {"title", "taken_at", "meta", "thumbhash"}
    if unknown:
        raise InvalidArgument(f"cannot set {', '.join(sorted(unknown))} of a memory")
    limits = {"title": 500, "taken_at": 40, "thumbhash": 64}
    for name, limit in limits.items():
        if fields.get(name) is not None:
            inputs.text(fields[name], name, max_length=limit, min_length=0)
    if fields.get("meta") is not None:
        inputs.metadata(fields["meta"])
    return fields


def _derivative_status(present: dict[str, Asset], job_state: str | None) -> dict[str, str]:
    """Per derived role: ``ready`` once the asset exists (whoever made it); otherwise what
    the memory's job says, or ``absent`` when there is no job (no original yet)."""
    if job_state in ("pending", "running"):
        waiting = "pending"
    elif job_state in ("failed", "unsupported"):
        waiting = job_state
    elif job_state == "done":
        waiting = "failed"  # done without the asset cannot happen; never claim "ready"
    else:
        waiting = "absent"
    return {role: "ready" if role in present else waiting for role in DERIVED_ROLES}


def _encode_cursor(memory: Memory) -> str:
    raw = json.dumps([memory.created_at, memory.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    """The position ``_encode_cursor`` wrote; anything else is refused, whatever its shape."""
    bad = InvalidArgument("cursor is not one this server issued")
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, RecursionError) as exc:  # base64, UTF-8 and JSON errors alike
        raise bad from exc
    if not (isinstance(value, list) and len(value) == 2):
        raise bad
    created_at, memory_id = value
    if (not isinstance(created_at, float | int) or isinstance(created_at, bool)
            or not isinstance(memory_id, str) or not is_id(memory_id, "mem")):
        raise bad
    try:
        position = float(created_at)
    except OverflowError as exc:
        raise bad from exc
    if not math.isfinite(position):
        raise bad
    return position, memory_id
