"""Upload sessions: begin, chunks, status, finish, abort, list."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import http_sf
from fastapi import APIRouter, Path, Request, Response

from memvault.capsules import Memory
from memvault.errors import InvalidArgument
from memvault.http.deps import Caller, Services, Svc, list_header
from memvault.http.direct import EXTENSION, DirectBody
from memvault.http.schemas import (
    BeginIn,
    ChunkOut,
    FinishIn,
    FinishManyIn,
    FinishManyOut,
    FinishOut,
    SessionList,
    SessionOut,
    memory_out,
    session_out,
)
from memvault.sessions import Body, ChunkChecksums, FinishItem, Session
from memvault.uploads import BeginRequest

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])


@router.post("", status_code=201, response_model=SessionOut,
             responses={200: {"description": "the pending session with this idempotency key",
                              "model": SessionOut}})
async def begin(body: BeginIn, caller: Caller, svc: Svc, response: Response) -> SessionOut:
    session, created = await svc.uploads.begin(caller, BeginRequest(**body.model_dump()))
    if not created:
        response.status_code = 200
        received, total = await svc.uploads.sessions.received(session)
        return session_out(session, received, total)
    return session_out(session, [], 0)


@router.get("", response_model=SessionList)
async def list_sessions(caller: Caller, svc: Svc) -> SessionList:
    sessions = await svc.uploads.list_sessions(caller)
    items = []
    for s in sessions:
        received, total = await svc.uploads.sessions.received(s)
        items.append(session_out(s, received, total))
    return SessionList(items=items)


@router.get("/{session_id}", response_model=SessionOut)
async def status(session_id: str, caller: Caller, svc: Svc) -> SessionOut:
    return session_out(*await svc.uploads.status(caller, session_id))


ChunkIndex = Annotated[str, Path(
    pattern=r"^(0|[1-9][0-9]{0,9})$",
    description="the chunk's index, 0 to chunk_count - 1, in plain decimal: no sign, space, "
    "leading zero or `_` (a lax parse would read `1_0` as 10)")]


@router.put(
    "/{session_id}/chunks/{index}",
    response_model=ChunkOut,
    openapi_extra={
        "parameters": [
            {"name": "Content-Length", "in": "header", "required": True,
             "schema": {"type": "integer", "minimum": 0},
             "description": "the chunk's exact length (no chunked transfer coding)"},
            {"name": "Content-Digest", "in": "header", "required": False,
             "schema": {"type": "string"},
             "description": "RFC 9530, e.g. `sha-256=:…:, crc32c=:…:`; a wrong digest → 422 "
             "`checksum_mismatch` and nothing is received"},
        ],
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                 "format": "binary"}}},
            "description": "exactly the chunk's bytes; optional `Content-Digest` "
            "(RFC 9530: `sha-256`, `crc32c`) is checked against them",
        }
    },
)
async def put_chunk(
    session_id: str, index: ChunkIndex, request: Request, caller: Caller, svc: Svc
) -> ChunkOut:
    checksums = parse_content_digest(list_header(request, "content-digest"))
    chunk = int(index)
    with svc.slots.hold(caller.id), svc.metrics.chunk_seconds.time():
        result = await svc.uploads.put_chunk(
            caller, session_id, chunk, _content_length(request), _body(request, svc), checksums
        )
    if not result.duplicate:
        svc.metrics.bytes_received.inc(result.session.chunk_range(chunk)[1])
    return ChunkOut(index=result.index, duplicate=result.duplicate,
                    received_count=result.received_count, bytes_received=result.bytes_received)


@router.post("/finish", response_model=FinishManyOut)
async def finish_many(body: FinishManyIn, caller: Caller, svc: Svc) -> FinishManyOut:
    """Finish several uploads (an original and its derivatives) in one commit."""
    items = [FinishItem(u.id, u.size, u.sha256) for u in body.uploads]
    with svc.metrics.finish_seconds.time():
        done = await svc.uploads.finish_many(caller, items)
    return FinishManyOut(items=[_finished(svc, s, m) for s, m in done])


@router.post("/{session_id}/finish", response_model=FinishOut)
async def finish(session_id: str, body: FinishIn, caller: Caller, svc: Svc) -> FinishOut:
    with svc.metrics.finish_seconds.time():
        session, memory = await svc.uploads.finish(caller, session_id, body.size, body.sha256)
    return _finished(svc, session, memory)


def _finished(svc: Services, session: Session, memory: Memory) -> FinishOut:
    role = session.attrs["role"]
    if svc.runner is not None and role == "original":
        svc.runner.wake()  # its derivative job was enqueued with the commit
    out = memory_out(memory)
    return FinishOut(session_id=session.id, memory_id=memory.id, role=role,
                     asset=out.assets[role], memory=out)


@router.delete("/{session_id}", status_code=204)
async def abort(session_id: str, caller: Caller, svc: Svc) -> Response:
    await svc.uploads.abort(caller, session_id)
    return Response(status_code=204)


def _content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    raw = raw.strip(" \t")  # RFC 9110 §5.5: whitespace around a value is not part of it
    if not (raw.isascii() and raw.isdigit()):
        raise InvalidArgument("Content-Length must be a non-negative integer")
    return int(raw)


def _body(request: Request, svc: Services) -> Body:
    """The chunk's body: read directly by ``memvault serve``'s protocol, else through ASGI."""
    direct = (request.scope.get("extensions") or {}).get(EXTENSION)
    if isinstance(direct, DirectBody):
        svc.metrics.chunk_bodies.labels("direct").inc()
        return direct
    svc.metrics.chunk_bodies.labels("asgi").inc()
    return request.stream()


def parse_content_digest(header: str | None) -> ChunkChecksums:
    """RFC 9530 ``Content-Digest``: ``sha-256`` and ``crc32c`` are checked, others ignored."""
    if not header:
        return ChunkChecksums()
    try:
        parsed = http_sf.parse(header.encode(), tltype="dictionary")
    except Exception as exc:  # http_sf raises plain ValueError-like errors for bad syntax
        raise InvalidArgument(f"Content-Digest is not a structured field: {exc}") from exc
    if not isinstance(parsed, dict):
        raise InvalidArgument("Content-Digest must be a dictionary of digests")
    fields: Mapping[str, object] = parsed
    sha = _digest_bytes(fields, "sha-256", 32)
    crc = _digest_bytes(fields, "crc32c", 4)
    return ChunkChecksums(
        crc32c=int.from_bytes(crc, "big") if crc is not None else None, sha256=sha
    )


def _digest_bytes(fields: Mapping[str, object], name: str, size: int) -> bytes | None:
    if name not in fields:
        return None
    value = fields[name]
    raw = value[0] if isinstance(value, tuple) else value
    if not isinstance(raw, bytes) or len(raw) != size:
        raise InvalidArgument(f"Content-Digest {name} must be a {size}-byte sequence")
    return raw
