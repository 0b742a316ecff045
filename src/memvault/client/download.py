"""Reading an asset's bytes to a file or a stream, resuming with ``Range`` and verifying them.

To a path, bytes go to ``NAME.<digest>.part`` first, named after the asset's SHA-256 so that
the part of another asset stored under the same name (two cameras' ``IMG_0001.JPG``) is never
continued with this one's bytes; a part left by an interrupted download of this asset is
continued where it stopped (its prefix is hashed from the disk, then ``Range: bytes=N-`` with
``If-Range`` set to the asset's ETag asks for the rest). The whole is checked against the
asset's size and SHA-256 before it is renamed into place, so ``NAME`` only ever appears
complete and verified; a continued part that still does not match is fetched once more from
the start. A connection that breaks mid-body is retried from the byte it reached (every byte
received is written), under the client's retry policy, whose count starts again whenever an
attempt made progress; a stream is resumed that way within one call too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mimetypes
import os
import re
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from memvault.client.errors import BadResponse, ChecksumMismatch, from_response
from memvault.client.models import Asset, Memory, Progress
from memvault.client.retry import Attempts, transient_status
from memvault.client.transport import Transport, connection_failed
from memvault.client.upload import ProgressCallback

_PIECE = 1024 * 1024
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def target_path(dest: Path, memory: Memory, asset: Asset) -> Path:
    """``dest`` itself, or inside it when it is a folder, named after the asset (its base
    name only: a stored filename never picks the folder; ``MEMORY.ROLE.EXT`` without one)."""
    if not dest.is_dir():
        return dest
    name = _fitting(os.path.basename(asset.filename or "").strip()).strip()
    if name in ("", ".", ".."):
        # A derivative the server made has no file name: MEMORY.ROLE, and the extension
        # of its type, so that it opens as what it is.
        ext = mimetypes.guess_extension(asset.content_type.partition(";")[0].strip()) or ""
        name = f"{memory.id}.{asset.role}{ext}"
    return dest / name


def _fitting(name: str, limit: int = 255) -> str:
    """``name`` shortened to what a file name may be (``limit`` bytes), its extension kept:
    the server takes file names of up to 500 characters."""
    if len(os.fsencode(name)) <= limit:
        return name
    stem, ext = os.path.splitext(name)
    if len(os.fsencode(ext)) > limit // 4:
        stem, ext = name, ""
    while stem and len(os.fsencode(stem + ext)) > limit:
        stem = stem[:-1]
    return stem + ext


async def download(api: Transport, memory: Memory, asset: Asset, dest: Path | BinaryIO,
                   on_progress: ProgressCallback | None = None) -> Path | None:
    """Fetch ``asset`` into ``dest``; returns the file written (None for a stream)."""
    if not isinstance(dest, Path):
        sink = _Sink(dest, restartable=False)
        await _fetch(api, asset, sink, hashlib.sha256(), 0, on_progress)
        return None
    path = target_path(dest, memory, asset)
    part = part_path(path, asset)
    f = await asyncio.to_thread(_open_part, part)
    try:
        sink = _Sink(f, restartable=True)
        hasher, offset = await asyncio.to_thread(_hash_prefix, f, asset.size)
        try:
            await _fetch(api, asset, sink, hasher, offset, on_progress)
        except ChecksumMismatch:
            if not offset:
                raise
            # What an earlier attempt left was not this asset's prefix after all.
            await asyncio.to_thread(sink.restart)
            await _fetch(api, asset, sink, hashlib.sha256(), 0, on_progress)
        await asyncio.to_thread(os.fsync, f.fileno())
    except ChecksumMismatch:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            part.unlink()  # a wrong prefix would be resumed forever otherwise
        raise
    finally:
        f.close()
    await asyncio.to_thread(os.replace, part, path)
    return path


def part_path(path: Path, asset: Asset) -> Path:
    """Where ``path``'s bytes gather until they are complete and verified: beside it, named
    after it and the asset's digest; a hidden name of the digest alone when that would be
    longer than a file name may be (255 bytes)."""
    name = f"{path.name}.{asset.sha256[:16]}.part"
    if len(os.fsencode(name)) > 255:
        name = f".{asset.sha256[:32]}.part"
    return path.with_name(name)


class _Sink:
    def __init__(self, f: BinaryIO, *, restartable: bool) -> None:
        self.f = f
        self.restartable = restartable

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self.f.write(view)
            view = view[n if n is not None else len(view):]

    def restart(self) -> bool:
        """Empty the file to receive the whole body again; False for a stream."""
        if not self.restartable:
            return False
        self.f.seek(0)
        self.f.truncate()
        return True


def _open_part(part: Path) -> BinaryIO:
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    return os.fdopen(fd, "r+b")


def _hash_prefix(f: BinaryIO, size: int) -> tuple[Any, int]:
    """The SHA-256 of what an earlier attempt left, and where to continue."""
    hasher = hashlib.sha256()
    have = f.seek(0, os.SEEK_END)
    if have > size:  # not a prefix of this asset: start over
        f.seek(0)
        f.truncate()
        return hasher, 0
    f.seek(0)
    left = have
    while left:
        piece = f.read(min(4 * _PIECE, left))
        if not piece:
            break
        hasher.update(piece)
        left -= len(piece)
    f.seek(have)
    return hasher, have


async def _fetch(api: Transport, asset: Asset, sink: _Sink, hasher: Any, offset: int,
                 on_progress: ProgressCallback | None) -> None:
    attempts = Attempts(api.retry, f"GET {asset.url}")
    etag = f'"{asset.sha256}"'
    while offset < asset.size:
        headers = {"Range": f"bytes={offset}-", "If-Range": etag} if offset else {}
        skip = 0
        try:
            async with api.http.stream("GET", asset.url, headers=headers) as response:
                if response.status_code >= 300:
                    await response.aread()
                    error = from_response(response)
                    if not transient_status(error):
                        raise error
                    await attempts.wait(error)
                    continue
                if response.status_code == 206:
                    _check_range(response, offset)
                elif offset:
                    # The whole body again (the server ignored the range).
                    if await asyncio.to_thread(sink.restart):
                        hasher, offset = hashlib.sha256(), 0
                    else:
                        skip = offset
                # As they arrive: a piece gathered but not yet written would be lost with
                # the connection, and a link that breaks more often than a piece fills
                # would never get anywhere.
                async for piece in response.aiter_bytes():
                    if skip:
                        dropped = min(skip, len(piece))
                        piece, skip = piece[dropped:], skip - dropped
                        if not piece:
                            continue
                    await asyncio.to_thread(sink.write, piece)
                    hasher.update(piece)
                    offset += len(piece)
                    attempts.progressed()
                    if on_progress is not None:
                        on_progress(Progress(
                            filename=asset.filename or asset.role, role=asset.role,
                            phase="transfer", bytes_done=offset, total=asset.size,
                            bytes_sent=0, chunks_done=0, chunk_count=0))
        except httpx.TransportError as exc:
            await attempts.wait(connection_failed(f"GET {asset.url}", exc))
    computed = hasher.hexdigest()
    if offset != asset.size or computed != asset.sha256:
        raise ChecksumMismatch(
            f"the downloaded bytes of {asset.url} do not match the asset: {offset} bytes "
            f"with SHA-256 {computed}, expected {asset.size} with {asset.sha256}",
            expected=asset.sha256, computed=computed, during="download")


def _check_range(response: httpx.Response, offset: int) -> None:
    match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
    if match is None or int(match.group(1)) != offset:
        raise BadResponse(
            f"asked for bytes from {offset}, got Content-Range "
            f"{response.headers.get('content-range')!r}", http_status=response.status_code)
