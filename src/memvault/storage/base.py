"""The blob store port. Backends speak only this vocabulary; the session core drives it.

A session's bytes go to a *staging* area named by a key the core chooses. Writes land at byte
offsets, in any order, from many requests at once (never two to the same range: the core's
claims see to that). ``commit`` makes the staged bytes an immutable blob addressed by their
SHA-256; ``discard`` throws the staging area away.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from memvault.hashing import Sha256State


class StagingGone(Exception):
    """The staging area is gone (the session was aborted or expired under the writer)."""


class BlobMissing(Exception):
    """A committed blob the metadata refers to is not in the store: data loss, never normal."""


class PartWriter(Protocol):
    async def write(self, pieces: Sequence[bytes]) -> None:
        """Write ``pieces`` back to back at the writer's current position."""
        ...

    async def close(self, *, durable: bool) -> None:
        """Finish the write; with ``durable`` the bytes are on stable storage on return."""
        ...


class BlobStore(Protocol):
    name: str

    async def stage(self, key: str) -> None:
        """Create an empty staging area (idempotent)."""
        ...

    async def open_writer(self, key: str, offset: int) -> PartWriter:
        """A writer positioned at ``offset`` of the staging area; ``StagingGone`` if absent."""
        ...

    def read_staged(self, key: str, offset: int, length: int) -> AsyncIterator[bytes]:
        """Stream ``length`` staged bytes from ``offset`` (to hash bytes that arrived early)."""
        ...

    async def commit(self, key: str, sha256: str, size: int) -> str:
        """Make the staged bytes the blob for ``sha256``; returns its storage key.

        Idempotent: a retry after a crash between commit and the metadata transaction finds
        the blob already in place. When the blob already exists (same content committed
        before), the staging area is dropped and the existing blob kept.
        """
        ...

    async def discard(self, key: str) -> None:
        """Remove a staging area and everything in it (idempotent)."""
        ...

    async def staged_keys(self, older_than: float) -> list[str]:
        """Staging areas last written before ``older_than`` (epoch seconds), for the sweep
        of those no session owns any more."""
        ...

    def read(self, storage_key: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Stream bytes ``[start, end)`` of a committed blob; ``BlobMissing`` if it is gone."""
        ...

    async def free_bytes(self) -> int | None:
        """Free space for new uploads, or None when the backend has no such limit."""
        ...


@runtime_checkable
class StagedHasher(Protocol):
    """Optional capability: hash a staged range next to the bytes, in one step.

    The generic path streams the range through the event loop piece by piece; a store that can
    read and hash in one worker thread saves those round trips (the hash frontier's catch-up).
    """

    async def hash_staged(self, key: str, offset: int, length: int, state: Sha256State) -> None:
        """Update ``state`` with ``length`` staged bytes from ``offset``."""
        ...


@runtime_checkable
class LocalPaths(Protocol):
    """Optional capability: committed blobs are files on this machine (derivative jobs hand
    the path to a decoder process instead of copying the bytes)."""

    def blob_path(self, storage_key: str) -> Path: ...
