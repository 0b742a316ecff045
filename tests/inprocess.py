"""The services built in-process, without HTTP, on a throwaway data dir and a manual clock.

Mirrors ``memvault.http.app.open_services``; used by tests that drive the upload core directly
(state machines, deterministic interleavings) and need to look at the metadata and staging
files behind it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Any

import sqlalchemy as sa

from memvault.auth import AuthService, Principal
from memvault.capsules import CapsuleService
from memvault.clock import ManualClock
from memvault.metadata import Database
from memvault.metadata.migrate import upgrade
from memvault.metadata.schema import upload_parts, upload_sessions
from memvault.sessions import ChunkChecksums
from memvault.settings import Settings
from memvault.storage.base import BlobStore
from memvault.storage.factory import close_blob_store, open_blob_store
from memvault.uploads import BeginRequest, UploadService

KiB = 1024
CHUNK = 64 * KiB

TEST_SETTINGS: dict[str, Any] = {
    "chunk_size": CHUNK,
    "min_chunk_size": KiB,
    "storage_reserve": 0,
    "max_pending_per_capsule": 1000,
    "session_ttl": 100,
}


@dataclass
class InProcess:
    """Everything a test needs to drive uploads for one principal in one capsule."""

    root: Path
    settings: Settings
    clock: ManualClock
    db: Database
    store: BlobStore
    capsules: CapsuleService
    uploads: UploadService
    auth: AuthService
    caller: Principal
    capsule_id: str

    @property
    def staging_dir(self) -> Path:
        return self.root / "staging"

    def staged_files(self) -> set[str]:
        return set(os.listdir(self.staging_dir))

    def begin_request(self, size: int, key: str, **extra: Any) -> BeginRequest:
        return BeginRequest(capsule_id=self.capsule_id, filename="f.bin",
                            content_type="application/octet-stream", size=size,
                            idempotency_key=key, **extra)

    async def session_row(self, session_id: str) -> dict[str, Any] | None:
        query = sa.select(upload_sessions).where(upload_sessions.c.id == session_id)
        row = await self.db.query(lambda conn: conn.execute(query).mappings().first())
        return dict(row) if row is not None else None

    async def part_rows(self, state: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(upload_parts)
        if state is not None:
            query = query.where(upload_parts.c.state == state)
        rows = await self.db.query(lambda conn: conn.execute(query).mappings().all())
        return [dict(r) for r in rows]

    async def sent(self, data: bytes, key: str, seed: int = 3) -> str:
        """A session begun for ``data`` with every chunk received and none finished."""
        session, _ = await self.uploads.begin(self.caller, self.begin_request(len(data), key))
        rng = Random(seed)
        for index in range(session.chunk_count):
            offset, length = session.chunk_range(index)
            await self.uploads.put_chunk(self.caller, session.id, index, length,
                                         pieces(data[offset:offset + length], rng),
                                         ChunkChecksums())
        return session.id

    async def read_asset(self, storage_key: str, size: int) -> bytes:
        pieces = [piece async for piece in self.store.read(storage_key, 0, size)]
        return b"".join(pieces)


def _scratch_dir() -> Path:
    """A fresh directory, on tmpfs when there is one (fsync-heavy code runs much faster)."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="memvault-test-", dir=base))


@contextlib.asynccontextmanager
async def inprocess(root: Path | None = None, **overrides: Any) -> AsyncIterator[InProcess]:
    """Build the services on ``root`` (default: a fresh scratch dir, removed afterwards)."""
    owned = root is None
    path = _scratch_dir() if root is None else root
    try:
        settings = Settings(data_dir=path, **{**TEST_SETTINGS, **overrides})
        await upgrade(settings.resolved_database_url)
        db = Database.open(settings.resolved_database_url)
        try:
            clock = ManualClock()
            store = await open_blob_store(settings)
            capsules = CapsuleService(db, clock)
            auth = AuthService(db, clock)
            caller, _token = await auth.create_principal("alice")
            capsule = await capsules.create_capsule(caller, "photos")
            uploads = UploadService(db, store, clock, settings, capsules)
            try:
                yield InProcess(
                    root=path, settings=settings, clock=clock, db=db, store=store,
                    capsules=capsules, uploads=uploads,
                    auth=auth, caller=caller, capsule_id=str(capsule["id"]),
                )
            finally:
                await uploads.sessions.close()
                await close_blob_store(store)
        finally:
            await db.dispose()
    finally:
        if owned:
            shutil.rmtree(path, ignore_errors=True)


async def pieces(data: bytes, rng: Random, *, max_pieces: int = 4) -> AsyncIterator[bytes]:
    """``data`` as a request body: a few random-sized pieces, sometimes with empty ones."""
    n = rng.randint(1, max_pieces)
    cuts = sorted(rng.randint(0, len(data)) for _ in range(n - 1))
    start = 0
    for cut in [*cuts, len(data)]:
        yield data[start:cut]
        start = cut
