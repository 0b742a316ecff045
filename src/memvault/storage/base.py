"""The blob store port. Backends speak only this vocabulary; the session core drives it.

A session's bytes go to a *staging* area the store names at ``stage``. Writes land as parts at
byte offsets, in any order, from many requests at once (never two to the same range: the core's
claims see to that). ``seal`` makes the staged parts one whole (a no-op where they already are
one file; S3 completes its multipart upload there); ``commit`` makes it an immutable blob and
names its storage key; ``discard`` throws a staging area away.

Exceptions::

    StagingGone        the staging area was discarded under the caller (abort, expiry)
    StagedUnavailable  these staged bytes cannot be read here until the area is sealed
    BlobMissing        a committed blob is not in the store (data loss, never normal)
    BlobDamaged        a committed blob's stored size is not the recorded one (data loss)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from memvault.hashing import Sha256State


class StagingGone(Exception):
    """The staging area is gone (the session was aborted or expired under the writer)."""


class StagedDamaged(Exception):
    """A staging area does not hold the bytes received into it (something outside memvault
    truncated or extended a staging file; S3 refused the recorded parts of an upload, one of
    them replaced by a late writer): they are lost, and no finish of its session can
    succeed. ``why`` says what was found, for the log and the client."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"staged {key}: {why}")
        self.key = key
        self.why = why

    @classmethod
    def sized(cls, key: str, found: int, expected: int) -> StagedDamaged:
        return cls(key, f"{found} bytes where {expected} were received")


class StagedUnavailable(Exception):
    """Staged bytes this process cannot read before the staging area is sealed (S3: a part of
    an unfinished multipart upload that another process received). Raised before anything is
    read, so a caller may stop there and go on after ``seal``."""


class BlobMissing(Exception):
    """A committed blob the metadata refers to is not in the store: data loss, never normal."""


class BlobDamaged(Exception):
    """A committed blob holds another number of bytes than the metadata recorded (a file
    truncated or appended to behind the server's back, a restore gone wrong): data loss,
    never normal. Raised before any byte is served."""

    def __init__(self, storage_key: str, stored: int, expected: int,
                 where: str = "in the store") -> None:
        super().__init__(f"{storage_key}: {stored} bytes {where}, {expected} expected")
        self.storage_key = storage_key
        self.stored = stored
        self.expected = expected
        self.where = where

    @property
    def sizes(self) -> str:
        """``N bytes on disk, M expected``."""
        return f"{self.stored} bytes {self.where}, {self.expected} expected"


Piece = bytes | memoryview
"""Part of a chunk in memory: a ``bytes`` the HTTP server handed over, or a view of a reused
buffer the body was read into (``memvault.http.direct``)."""

Digest = Callable[[Sequence[Piece]], None]
"""What the core runs over each batch of a chunk after it is written (its digests)."""


class PartWriter(Protocol):
    async def write(self, pieces: Sequence[Piece], then: Digest | None = None) -> None:
        """Write ``pieces`` back to back at the writer's current position; then, if given,
        run ``then(pieces)`` in the same worker thread (one hand-off per batch, not two)."""
        ...

    async def close(self, *, durable: bool) -> str | None:
        """Finish the part after all its bytes were written; with ``durable`` the bytes are on
        stable storage on return. Returns the store's *receipt* for the part (S3: part number,
        ETag and checksum), which the core records with the chunk and hands back to ``seal``;
        None when there is nothing to record. Releases the writer whether it succeeds or not.
        """
        ...

    async def abandon(self) -> None:
        """Release the writer after a failed transfer; nothing of the part counts."""
        ...


class BlobStore(Protocol):
    name: str

    async def stage(self, key: str) -> str:
        """Create an empty staging area for ``key`` (which the core chose, unique); returns the
        staging key to use for it from then on, which may carry the store's own reference."""
        ...

    async def open_writer(self, key: str, offset: int, *, length: int, part: int,
                          hashed: bool = False) -> PartWriter:
        """A writer for part ``part`` (0-based, ``length`` bytes) at ``offset`` of the staging
        area. ``StagingGone`` if the area is gone, here or when the part is closed.
        ``hashed``: the core digests these bytes as they stream (the part starts at the hash
        frontier), so they need not stay readable for ``read_staged`` before the seal."""
        ...

    def read_staged(self, key: str, offset: int, length: int) -> AsyncIterator[bytes]:
        """Stream ``length`` staged bytes from ``offset`` (to hash bytes that arrived early);
        ``StagedUnavailable`` if they cannot be read here before ``seal``."""
        ...

    async def seal(self, key: str, size: int, receipts: Sequence[str | None]) -> None:
        """Make the ``size`` staged bytes one whole, readable at any offset; no part is
        written after this. ``receipts`` are the parts' receipts in offset order. Idempotent:
        sealing a sealed area succeeds (a retry after a crash). ``StagingGone`` if discarded.
        """
        ...

    async def commit(self, key: str, sha256: str, size: int) -> str:
        """Make the sealed bytes the blob for ``sha256``; returns its storage key.

        Idempotent: a retry after a crash between commit and the metadata transaction finds
        the blob already in place. A store whose keys are content addresses keeps an existing
        blob of the same content and drops the staging area; one whose keys are not (S3)
        returns a new key, and the core discards the staging area again if the metadata
        already names another blob for ``sha256``.
        """
        ...

    async def discard(self, key: str) -> None:
        """Remove a staging area and everything in it, sealed or not (idempotent). The core
        calls it only for areas no committed session or blob row can name any more."""
        ...

    async def staged_keys(self, older_than: float) -> list[str]:
        """Staging areas last written (S3: begun) before ``older_than`` (epoch seconds), for
        the sweep of those no session owns any more."""
        ...

    def read(self, storage_key: str, start: int, end: int, *,
             size: int | None = None) -> AsyncIterator[bytes]:
        """Stream bytes ``[start, end)`` of a committed blob; ``BlobMissing`` if it is gone.
        With ``size`` (the recorded size), ``BlobDamaged`` before the first byte if the
        stored blob has another size (a cheap look at its length; its bytes are not hashed).
        """
        ...

    async def free_bytes(self) -> int | None:
        """Free space for new uploads, or None when the backend has no such limit."""
        ...

    async def check(self) -> None:
        """Raise ``OSError`` unless the store can be reached now (readiness)."""
        ...


@runtime_checkable
class StagedHasher(Protocol):
    """Optional capability: hash a staged range next to the bytes, in one step.

    The generic path streams the range through the event loop piece by piece; a store that can
    read and hash in one worker thread saves those round trips (the hash frontier's catch-up).
    Like ``read_staged`` it raises ``StagedUnavailable`` before touching ``state``.
    """

    async def hash_staged(self, key: str, offset: int, length: int, state: Sha256State) -> None:
        """Update ``state`` with ``length`` staged bytes from ``offset``."""
        ...


@runtime_checkable
class PartHolder(Protocol):
    """Optional capability: some staged bytes are readable before the seal only in the process
    that received them (S3: parts kept in this process's spool). Such a store's frontier moves
    are handed between processes (``memvault.sessions.handoff``)."""

    def holds_staged(self, key: str, offset: int) -> bool:
        """True if this process can hash the staged part starting at ``offset`` now."""
        ...


@runtime_checkable
class LocalPaths(Protocol):
    """Optional capability: committed blobs are files on this machine (derivative jobs hand
    the path to a decoder process instead of copying the bytes)."""

    def blob_path(self, storage_key: str) -> Path: ...


@runtime_checkable
class WriteProbe(Protocol):
    """Optional capability: the store can show it takes writes by making one (a file in the
    local staging folder): ``check`` only looks, and a full or read-only volume, or a folder
    the server may open but not write in, passes a look (readiness, cached briefly)."""

    async def probe_write(self) -> None:
        """Raise ``OSError`` unless a small file can be written, synced and removed where
        uploads are staged."""
        ...


@runtime_checkable
class LossWitness(Protocol):
    """Optional capability: the store can tell for certain that a staging area is gone for
    good (S3: the multipart upload no longer exists and was not completed into its object,
    as when a lifecycle rule aborted it), so its session can end instead of retrying."""

    async def staging_lost(self, key: str) -> bool: ...


@runtime_checkable
class WriterLiveness(Protocol):
    """Optional capability: the store can tell for certain that the process behind a chunk
    claim has ended (the local folder: each process holds a lock on a file of its own in
    ``writers/``, which the kernel lets go when the process dies), so a chunk that was in
    flight when its server was killed is taken over at once instead of after a lease."""

    writer_id: str
    """This store's (this process's) id, which its chunk claims carry."""

    async def writer_gone(self, writer_id: str) -> bool:
        """True only if the process that held ``writer_id`` has certainly ended."""
        ...


@runtime_checkable
class BlobAudit(Protocol):
    """Optional capability: committed blobs can be looked at one by one, for ``memvault
    blobs check`` (the local folder, and S3)."""

    async def missing_blobs(self, storage_keys: Sequence[str]) -> list[str]:
        """Those of ``storage_keys`` whose bytes are not there."""
        ...

    async def blob_sizes(self, storage_keys: Sequence[str]) -> dict[str, int]:
        """The stored size of each of ``storage_keys`` that is at its place (those that are
        not are left out: ``missing_blobs`` tells which of them are lost)."""
        ...

    async def hash_blob(self, storage_key: str) -> tuple[int, str]:
        """``(bytes read, SHA-256 hex)`` of a stored blob, read through once in pieces
        (memory stays flat whatever its size); ``BlobMissing`` if it is gone."""
        ...


@runtime_checkable
class ContentAddressed(BlobAudit, Protocol):
    """Optional capability: ``commit`` moves bytes to the one place kept for their content
    (the local folder), shared by every commit of the same bytes. Bytes placed for a commit
    that never happens are then nobody's staging area to discard; the core reserves a blob
    row before placing them and deletes unused ones with ``delete_blob``
    (``memvault.placement``)."""

    def blob_key(self, sha256: str) -> str:
        """The storage key ``commit`` gives the content ``sha256``."""
        ...

    async def delete_blob(self, storage_key: str,
                          confirm: Callable[[], Awaitable[bool]]) -> bool:
        """Delete a blob no row uses any more, fenced by ``confirm``: the bytes are first
        made unreachable (moved aside), then ``confirm()`` (the transaction that drops the
        caller's row, if the caller still holds it) decides. True: they go. False, or an
        error: they are put back, unless a new copy of the content was placed meanwhile.
        Returns what ``confirm`` returned (also when the bytes were gone already)."""
        ...

    def blob_files(self) -> AsyncIterator[list[tuple[str, int]]]:
        """Every stored content as ``(sha256, size)``, in batches (for ``memvault blobs
        check``: contents no row names)."""
        ...


@runtime_checkable
class PartLimits(Protocol):
    """Optional capability: the store bounds part sizes and counts (S3: every part but the
    last at least 5 MiB, at most 5 GiB, at most 10,000 parts). ``begin`` chooses a chunk size
    within them."""

    min_part_size: int
    max_part_size: int
    max_parts: int
