"""Local files for parts on their way to an object store, kept a while after the upload.

A part is written to a spool file as it arrives, then uploaded from it (the S3 store's
``S3PartWriter``). A part the core did not hash as it streamed (it arrived past the hash
frontier) is *kept* afterwards, so the frontier can hash it from local disk when the gap
before it fills: the parts of an unfinished multipart upload cannot be read back. Kept parts
go when they are hashed, when the frontier passes them, when their upload is committed or
discarded, after ``keep_seconds``, or oldest first beyond ``keep_bytes``; a part no longer
kept is read back from the object after the seal instead.

Each process has its own folder under the spool root (``<pid>-…``), removed when it closes;
folders of processes that died are removed by the next one to open the same root.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import crc32c

from memvault.hashing import Sha256State
from memvault.storage.base import Digest, Piece
from memvault.storage.descriptor import Descriptor
from memvault.storage.local import out_of_space_is_typed

_READ_PIECE = 1024 * 1024

Upload = Callable[[Path, int], Awaitable[str]]
"""Uploads a spooled part: (file, CRC32C of its bytes) → the part's receipt."""


@dataclass
class _Kept:
    path: Path
    length: int
    at: float


class SpooledPart:
    """A part writer that spools the part to a local file and, once all of it is there,
    hands the file to ``upload`` (which returns the part's receipt)."""

    def __init__(self, spool: Spool, name: str, offset: int, length: int, upload: Upload,
                 *, keep: bool) -> None:
        self._spool = spool
        self._name = name
        self._offset = offset
        self._length = length
        self._upload = upload
        self._keep = keep
        fd, self._path = spool.new_file()
        self._fd = fd
        self._file: Descriptor | None = Descriptor(fd)
        self._written = 0
        self._crc = 0

    async def write(self, pieces: Sequence[Piece], then: Digest | None = None) -> None:
        assert self._file is not None
        with out_of_space_is_typed():
            self._written += await self._file.run(self._append, list(pieces), then)

    def _append(self, pieces: list[Piece], then: Digest | None = None) -> int:
        total = 0
        for piece in pieces:
            view = memoryview(piece)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                total += n
            self._crc = crc32c.crc32c(piece, self._crc)
        if then is not None:
            then(pieces)
        return total

    async def close(self, *, durable: bool) -> str | None:
        # The object store makes the part durable when it answers; the spool file is only a
        # staging copy, never synced.
        try:
            if self._written != self._length:
                raise OSError(errno.EIO, f"part has {self._written} of {self._length} bytes")
            receipt = await self._upload(self._path, self._crc)
        except BaseException:
            await self.abandon()
            raise
        self._release()
        if self._keep:
            self._spool.keep(self._name, self._offset, self._length, self._path)
        else:
            self._path.unlink(missing_ok=True)
        return receipt

    async def abandon(self) -> None:
        self._release()
        self._path.unlink(missing_ok=True)

    def _release(self) -> None:
        if self._file is not None:
            self._file.close()  # once no write is running on it (``Descriptor``)
            self._file = None


class Spool:
    def __init__(self, root: Path, *, keep_bytes: int, keep_seconds: float) -> None:
        self.root = root
        self.keep_bytes = keep_bytes
        self.keep_seconds = keep_seconds
        self.folder = root  # this process's own folder, from open()
        self._kept: dict[str, dict[int, _Kept]] = {}
        self.kept_bytes = 0

    async def open(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(_remove_dead, self.root)
        self.folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self.root))

    async def close(self) -> None:
        self._kept.clear()
        self.kept_bytes = 0
        await asyncio.to_thread(shutil.rmtree, self.folder, True)

    def new_file(self) -> tuple[int, Path]:
        fd, name = tempfile.mkstemp(dir=self.folder, prefix="part-")
        return fd, Path(name)

    def keep(self, name: str, offset: int, length: int, path: Path) -> None:
        """Keep an uploaded part of upload ``name`` at ``offset``, within the budget."""
        parts = self._kept.setdefault(name, {})
        old = parts.pop(offset, None)
        if old is not None:
            self._drop(old)
        parts[offset] = _Kept(path, length, time.monotonic())
        self.kept_bytes += length
        self.prune()

    def prune(self) -> None:
        """Drop kept parts past their age, then the oldest until within the byte budget."""
        limit = time.monotonic() - self.keep_seconds
        entries = sorted((k.at, name, offset) for name, parts in self._kept.items()
                         for offset, k in parts.items())
        for at, name, offset in entries:
            if at >= limit and self.kept_bytes <= self.keep_bytes:
                break
            self._drop(self._kept[name].pop(offset))
            if not self._kept[name]:
                del self._kept[name]

    def forget(self, name: str) -> None:
        """Drop every kept part of upload ``name`` (committed or discarded)."""
        for kept in self._kept.pop(name, {}).values():
            self._drop(kept)

    def _drop(self, kept: _Kept) -> None:
        self.kept_bytes -= kept.length
        kept.path.unlink(missing_ok=True)

    def holds(self, name: str, offset: int) -> bool:
        """True if a part of upload ``name`` starting at ``offset`` is kept here."""
        return offset in self._kept.get(name, {})

    def _held(self, name: str, offset: int, length: int) -> _Kept | None:
        kept = self._kept.get(name, {}).get(offset)
        return kept if kept is not None and kept.length == length else None

    def pieces(self, name: str, offset: int, length: int) -> AsyncIterator[bytes] | None:
        """The kept part's bytes, or None if it is not kept here."""
        kept = self._held(name, offset, length)
        return None if kept is None else _file_pieces(kept.path, length)

    async def hash(self, name: str, offset: int, length: int, state: Sha256State) -> bool:
        """Update ``state`` with a kept part and drop it; False (``state`` untouched) if it
        is not kept here. The frontier only moves forward: parts before ``offset`` go too."""
        parts = self._kept.get(name, {})
        for below in [o for o in parts if o < offset]:
            self._drop(parts.pop(below))
        kept = self._held(name, offset, length)
        if kept is None:
            return False
        try:
            await asyncio.to_thread(_hash_file, kept.path, length, state)
        except FileNotFoundError:
            return False  # pruned before the thread opened it
        if parts.get(offset) is kept:
            self._drop(parts.pop(offset))
        return True


async def _file_pieces(path: Path, length: int) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        left = length
        while left:
            piece = await asyncio.to_thread(f.read, min(_READ_PIECE, left))
            if not piece:
                raise OSError(errno.EIO, f"unexpected end of {path}")
            left -= len(piece)
            yield piece


def _hash_file(path: Path, length: int, state: Sha256State) -> None:
    """Hash a kept part; ``state`` is untouched if the file is gone before it is opened."""
    buf = bytearray(min(_READ_PIECE, max(length, 1)))
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        left = length
        while left:
            n = f.readinto(view[: min(len(buf), left)])
            if not n:
                raise OSError(errno.EIO, f"unexpected end of {path}")
            state.update(view[:n])
            left -= n


def _remove_dead(root: Path) -> None:
    """Spool folders of processes that are gone (killed before they could clean up)."""
    for entry in root.iterdir():
        pid_text = entry.name.split("-", 1)[0]
        if not (entry.is_dir() and pid_text.isdigit()):
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            continue  # alive, someone else's
