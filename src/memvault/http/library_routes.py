"""Capsules and memories."""

from __future__ import annotations

from fastapi import APIRouter, Query

from memvault.clock import iso
from memvault.http.deps import Caller, Svc
from memvault.http.schemas import (
    CapsuleIn,
    CapsuleOut,
    MemoryIn,
    MemoryOut,
    MemoryPage,
    MemoryPatch,
    memory_out,
)

router = APIRouter(prefix="/v1", tags=["library"])


@router.post("/capsules", status_code=201, response_model=CapsuleOut)
async def create_capsule(body: CapsuleIn, caller: Caller, svc: Svc) -> CapsuleOut:
    row = await svc.capsules.create_capsule(caller, body.name)
    return CapsuleOut(id=row["id"], name=row["name"], created_at=iso(row["created_at"]))


@router.get("/capsules", response_model=list[CapsuleOut])
async def list_capsules(caller: Caller, svc: Svc) -> list[CapsuleOut]:
    rows = await svc.capsules.list_capsules(caller)
    return [CapsuleOut(id=r["id"], name=r["name"], created_at=iso(r["created_at"])) for r in rows]


@router.post("/capsules/{capsule_id}/memories", status_code=201, response_model=MemoryOut)
async def create_memory(capsule_id: str, body: MemoryIn, caller: Caller, svc: Svc) -> MemoryOut:
    memory = await svc.capsules.new_memory(
        caller, capsule_id, title=body.title, taken_at=body.taken_at, meta=body.metadata
    )
    return memory_out(memory)


@router.get("/capsules/{capsule_id}/memories", response_model=MemoryPage)
async def list_memories(
    capsule_id: str,
    caller: Caller,
    svc: Svc,
    limit: int = Query(default=50, ge=1, le=500),
    cursor: str | None = None,
    sha256: str | None = Query(
        default=None, description="only memories whose original has this SHA-256 (hex)"
    ),
) -> MemoryPage:
    page = await svc.capsules.list_memories(caller, capsule_id, limit=limit, cursor=cursor,
                                            sha256=sha256)
    return MemoryPage(items=[memory_out(m) for m in page.items], next_cursor=page.next_cursor)


@router.get("/memories/{memory_id}", response_model=MemoryOut)
async def get_memory(memory_id: str, caller: Caller, svc: Svc) -> MemoryOut:
    return memory_out(await svc.capsules.get_memory(caller, memory_id))


@router.patch("/memories/{memory_id}", response_model=MemoryOut)
async def update_memory(memory_id: str, body: MemoryPatch, caller: Caller, svc: Svc) -> MemoryOut:
    fields = body.model_dump(include=body.model_fields_set)
    if "metadata" in fields:
        fields["meta"] = fields.pop("metadata") or {}
    return memory_out(await svc.capsules.update_memory(caller, memory_id, fields))
