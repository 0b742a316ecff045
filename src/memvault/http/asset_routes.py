"""Reading an asset's bytes: ``Range`` → 206, ``ETag`` from the SHA-256, ``If-None-Match`` →
304, ``If-Match`` → 412."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import structlog
from fastapi import APIRouter, Request, Response
from starlette.responses import StreamingResponse

from memvault import inputs
from memvault.errors import Internal, PreconditionFailed, RangeNotSatisfiable
from memvault.http.deps import Caller, Svc, list_header
from memvault.storage.base import BlobDamaged, BlobMissing

router = APIRouter(prefix="/v1", tags=["library"])
log = structlog.get_logger("memvault.http")

_RANGE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$", re.IGNORECASE)
"""One range (the unit's case does not matter, RFC 9110 §14.1); positions past 19 digits
(beyond any size) make the header one to ignore."""

# What /openapi.json says of the two operations below.
_CONDITIONS = [
    {"name": name, "in": "header", "required": False, "schema": {"type": "string"},
     "description": description}
    for name, description in [
        ("Range", "one `bytes=` range → 206 (several ranges → the whole asset)"),
        ("If-Range", "the ETag the range was taken against; another → the whole asset"),
        ("If-None-Match", "ETags (weak compare) or `*` → 304"),
        ("If-Match", "ETags (strong compare) or `*`; none matching → 412"),
    ]
]
_SERVED = {name: {"schema": {"type": "string"}, "description": description}
           for name, description in [
               ("ETag", "the SHA-256 of the bytes, quoted"),
               ("Accept-Ranges", "`bytes`"),
               ("Content-Disposition", "`inline; filename*=UTF-8''…` when a name is stored"),
           ]}
_OPENAPI_EXTRA: dict[str, Any] = {"parameters": _CONDITIONS}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "headers": _SERVED},
    206: {"description": "the requested range",
          "content": {"application/octet-stream": {}},
          "headers": {**_SERVED, "Content-Range": {"schema": {"type": "string"}}}},
    304: {"description": "If-None-Match named the current ETag", "headers": _SERVED},
}


# GET and HEAD are two operations of the document, each with its own id.
@router.get("/memories/{memory_id}/assets/{role}", operation_id="read_asset",
            response_class=Response, responses=_RESPONSES, openapi_extra=_OPENAPI_EXTRA)
@router.head("/memories/{memory_id}/assets/{role}", operation_id="read_asset_head",
             response_class=Response, responses=_RESPONSES, openapi_extra=_OPENAPI_EXTRA)
async def read_asset(memory_id: str, role: str, request: Request, caller: Caller,
                     svc: Svc) -> Response:
    asset = await svc.capsules.get_asset(caller, memory_id, role)
    etag = f'"{asset.sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        # Content-addressed bytes never change; but they are private to their readers.
        "Cache-Control": "private, max-age=31536000, immutable",
        # Whatever a client uploaded is data, never an active page of this origin: an HTML
        # or SVG asset opened here runs no script and reaches no cookie or storage, and no
        # browser second-guesses the stored type. Images and video still show.
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
    }
    if asset.filename:
        # RFC 8187: every byte outside attr-char percent-encoded, "/" too.
        headers["Content-Disposition"] = (
            f"inline; filename*=UTF-8''{quote(asset.filename, safe='')}")
    # RFC 9110 §13.2.2: If-Match first (strong comparison; there is no Last-Modified, so
    # If-Unmodified-Since and If-Modified-Since are ignored), then If-None-Match (weak).
    if_match = list_header(request, "if-match")
    if if_match is not None and not _matches(if_match, etag, weak=False):
        raise PreconditionFailed("If-Match names another version of this asset; its ETag "
                                 "is the current one", etag=etag)
    if _matches(list_header(request, "if-none-match"), etag, weak=True):
        return Response(status_code=304, headers=headers)
    start, end, status = 0, asset.size, 200
    wanted = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if wanted and (if_range is None or if_range == etag):
        parsed = _parse_range(wanted, asset.size)
        if parsed is not None:
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{asset.size}"
    headers["Content-Length"] = str(end - start)
    # Stored types are checked at begin; one from before that check that a header cannot
    # carry is served as plain bytes rather than failing the read.
    # As a header, not ``media_type``: Starlette would add "; charset=utf-8" to a text/ type,
    # and a Latin-1 text file would then read as UTF-8. The bytes are served as stored.
    headers["Content-Type"] = (asset.content_type if inputs.is_media_type(asset.content_type)
                               else "application/octet-stream")
    what = f"the {role} of memory {memory_id}"
    if request.method == "HEAD":
        # An empty read still finds the blob (a file open, an S3 HEAD), so HEAD answers as
        # GET would: a 500, not a 200 for bytes a GET cannot serve.
        await _primed(svc.store.read(asset.storage_key, start, start, size=asset.size), what)
        return Response(status_code=status, headers=headers)
    body = await _primed(svc.store.read(asset.storage_key, start, end, size=asset.size), what)
    return StreamingResponse(body, status_code=status, headers=headers)


def _matches(header: str | None, etag: str, *, weak: bool) -> bool:
    """Whether a list of entity tags (or ``*``) names ``etag``; a weak ``W/`` tag counts only
    in a weak comparison (If-None-Match), never in If-Match's strong one."""
    if not header:
        return False
    tags = {t.strip() for t in header.split(",")}
    if weak:
        tags = {t.removeprefix("W/") for t in tags}
    return "*" in tags or etag in tags


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range as [start, end); None to ignore (e.g. several ranges) → 200."""
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable("a suffix range of an empty asset selects nothing"
                                      if size == 0 else "empty suffix range", size=size)
        return max(0, size - suffix), size
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    if last and int(last) < start:
        raise RangeNotSatisfiable(f"range ends (byte {last}) before it starts (byte {start})",
                                  size=size)
    if start >= size:
        raise RangeNotSatisfiable(f"range starts past the end of {size} bytes", size=size)
    return start, end


async def _primed(pieces: AsyncIterator[bytes], what: str) -> AsyncIterator[bytes]:
    """Read the first piece before answering, so a missing blob (or one whose stored size is
    not the recorded one) is a 500, not a cut body or bytes that are not the asset's."""
    try:
        first = await anext(pieces)
    except StopAsyncIteration:
        first = b""
    except BlobMissing as exc:
        raise Internal("stored bytes for this asset are missing; the server log has details",
                       ) from exc
    except BlobDamaged as exc:
        log.error("asset.damaged", asset=what, storage_key=exc.storage_key,
                  stored_size=exc.stored, size=exc.expected)
        raise Internal(f"stored bytes of {what} are damaged: {exc.sizes}; the bytes are not "
                       "served (`memvault blobs check` lists every damaged asset)") from exc

    async def rest() -> AsyncIterator[bytes]:
        if first:
            yield first
        async for piece in pieces:
            yield piece

    return rest()
