"""JSON shapes of the v1 API (they are what ``/openapi.json`` documents)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from memvault.capsules import Asset, Memory
from memvault.clock import iso
from memvault.sessions import Session
from memvault.uploads import MAX_FINISH_BATCH


class Input(BaseModel):
    """A request body: a field the API does not know is refused, not dropped (a misspelled
    ``memoryId`` would otherwise make a new memory), and values keep their JSON types (no
    ``true`` or ``"10"`` read as a size)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class CapsuleIn(Input):
    name: str = Field(min_length=1, max_length=200)


class CapsuleOut(BaseModel):
    id: str
    name: str
    created_at: str | None


class MemoryIn(Input):
    title: str | None = Field(default=None, max_length=500)
    taken_at: str | None = Field(default=None, max_length=40)
    metadata: dict[str, Any] | None = None


class MemoryPatch(Input):
    """Fields to change; those left out keep their values (``metadata`` is replaced whole)."""

    title: str | None = Field(default=None, max_length=500)
    taken_at: str | None = Field(default=None, max_length=40)
    metadata: dict[str, Any] | None = None
    thumbhash: str | None = Field(
        default=None, max_length=64, pattern=r"^[A-Za-z0-9+/]+={0,2}$",
        description="ThumbHash of the placeholder (base64), e.g. made by the client's lane B",
    )


class AssetOut(BaseModel):
    role: str
    size: int
    sha256: str
    content_type: str
    filename: str | None
    created_at: str | None
    url: str


class MemoryOut(BaseModel):
    id: str
    capsule_id: str
    title: str | None
    taken_at: str | None
    metadata: dict[str, Any]
    created_at: str | None
    assets: dict[str, AssetOut]
    thumbhash: str | None = Field(
        default=None, description="ThumbHash of the placeholder (base64), paintable at once")
    derivatives: dict[str, str] = Field(
        default_factory=dict,
        description="per derived role: ready, pending, failed, unsupported or absent",
    )
    derivatives_reason: str | None = Field(
        default=None, description="why derivatives failed or are unsupported")


class MemoryPage(BaseModel):
    items: list[MemoryOut]
    next_cursor: str | None


class BeginIn(Input):
    capsule_id: str
    memory_id: str | None = None
    role: str = "original"
    filename: str = Field(min_length=1, max_length=500)
    content_type: str = Field(default="application/octet-stream", min_length=1, max_length=200)
    size: int = Field(ge=0)
    sha256: str | None = Field(default=None, description="hex SHA-256 of the whole file")
    idempotency_key: str = Field(min_length=1, max_length=200)


class SessionOut(BaseModel):
    id: str
    owner: str
    state: str
    capsule_id: str
    memory_id: str
    role: str
    filename: str
    content_type: str
    size: int
    chunk_size: int
    chunk_count: int
    received: list[int]
    received_count: int
    bytes_received: int
    created_at: str | None
    expires_at: str | None


class ChunkOut(BaseModel):
    index: int
    duplicate: bool
    received_count: int
    bytes_received: int


class FinishIn(Input):
    size: int = Field(ge=0)
    sha256: str


class FinishOut(BaseModel):
    session_id: str
    memory_id: str
    role: str
    asset: AssetOut
    memory: MemoryOut = Field(description="the memory as it reads after the commit")


class FinishItemIn(FinishIn):
    id: str = Field(description="the upload session")


class FinishManyIn(Input):
    uploads: list[FinishItemIn] = Field(
        min_length=1, max_length=MAX_FINISH_BATCH,
        description="1 to 16 sessions, each at most once: verified, then committed in one "
        "transaction, all or none")


class FinishManyOut(BaseModel):
    items: list[FinishOut] = Field(description="one per upload, in the order given")


class SessionList(BaseModel):
    items: list[SessionOut]


def asset_out(memory_id: str, asset: Asset) -> AssetOut:
    return AssetOut(
        role=asset.role, size=asset.size, sha256=asset.sha256,
        content_type=asset.content_type, filename=asset.filename,
        created_at=iso(asset.created_at), url=f"/v1/memories/{memory_id}/assets/{asset.role}",
    )


def memory_out(memory: Memory) -> MemoryOut:
    return MemoryOut(
        id=memory.id, capsule_id=memory.capsule_id, title=memory.title,
        taken_at=memory.taken_at, metadata=memory.meta, created_at=iso(memory.created_at),
        assets={role: asset_out(memory.id, a) for role, a in memory.assets.items()},
        thumbhash=memory.thumbhash, derivatives=memory.derivatives,
        derivatives_reason=memory.derivatives_reason,
    )


def session_out(session: Session, received: list[int], total: int) -> SessionOut:
    a = session.attrs
    return SessionOut(
        id=session.id, owner=session.owner, state=session.state, capsule_id=a["capsule_id"],
        memory_id=a["memory_id"], role=a["role"], filename=a["filename"],
        content_type=a["content_type"], size=session.size, chunk_size=session.chunk_size,
        chunk_count=session.chunk_count, received=received, received_count=len(received),
        bytes_received=total, created_at=iso(session.created_at),
        expires_at=iso(session.expires_at),
    )
