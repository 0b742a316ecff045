"""Blob rows: one per stored content (SHA-256), counted by the assets that use it."""

from __future__ import annotations

import sqlalchemy as sa

from memvault.metadata.schema import blobs


def record_blob(conn: sa.Connection, sha256: str, size: int, storage_key: str,
                now: float) -> str:
    """Count one more use of a committed blob, adding its row on first use (in ``conn``'s
    transaction, together with the asset that uses it). Returns the storage key the blob row
    names: ``storage_key``, or that of the same content stored before."""
    bumped = conn.execute(
        sa.update(blobs).where(blobs.c.sha256 == sha256).values(refcount=blobs.c.refcount + 1)
    )
    if bumped.rowcount == 0:
        conn.execute(
            sa.insert(blobs).values(sha256=sha256, size=size, storage_key=storage_key,
                                    refcount=1, created_at=now)
        )
        return storage_key
    return str(conn.execute(
        sa.select(blobs.c.storage_key).where(blobs.c.sha256 == sha256)
    ).scalar_one())
