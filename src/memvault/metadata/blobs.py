"""Blob rows: one per stored content (SHA-256), counted by the assets that use it.

Where a store keeps one file per content (the local folder), a row is *reserved* (refcount 0)
before bytes are moved into place, so that bytes a commit never came to use are found by their
row and collected (``memvault.placement``). Statements here run in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from memvault.metadata.schema import assets, blobs, upload_sessions

# Built once (docs/decisions.md, "Statements built once").
_HOLD_FOR = sa.update(upload_sessions).where(
    upload_sessions.c.id == sa.bindparam("b_session"), upload_sessions.c.state == "pending"
).values(placed_sha256=sa.bindparam("content"))
_UNCOLLECTED = sa.and_(blobs.c.sha256 == sa.bindparam("b_sha256"), blobs.c.collector.is_(None))
_MARK_PLACED = sa.update(blobs).where(_UNCOLLECTED).values(placed_at=sa.bindparam("now"))
_COUNT_USE = sa.update(blobs).where(_UNCOLLECTED).values(
    refcount=blobs.c.refcount + 1,
    # A reserved row names no bytes anyone uses yet: the first commit's count.
    storage_key=sa.case((blobs.c.refcount == 0,
                         sa.bindparam("key", type_=blobs.c.storage_key.type)),
                        else_=blobs.c.storage_key),
)
_NEW_BLOB = sa.insert(blobs)
_COLLECTOR = sa.select(blobs.c.collector).where(blobs.c.sha256 == sa.bindparam("b_sha256"))
_STORAGE_KEY = sa.select(blobs.c.storage_key).where(blobs.c.sha256 == sa.bindparam("b_sha256"))


class BlobCollected(Exception):
    """The content's row is being (or was) collected: the bytes placed for it may be gone."""

    def __init__(self, sha256: str) -> None:
        super().__init__(sha256)
        self.sha256 = sha256


class BlobBusy(Exception):
    """The content's file is being deleted right now; placing it must wait until it is."""

    def __init__(self, sha256: str) -> None:
        super().__init__(sha256)
        self.sha256 = sha256


def reserve_blobs(conn: sa.Connection, contents: Sequence[tuple[str, int, str]],
                  now: float, holders: Sequence[tuple[str, str]] = ()) -> None:
    """Before bytes are placed: a row for each ``(sha256, size, storage_key)``, new with
    refcount 0 or an existing one marked as placed ``now`` (which keeps it from being
    collected). ``BlobBusy`` if one is being collected. Rows are taken in SHA-256 order.

    ``holders``: ``(session_id, sha256)`` of pending upload sessions the bytes are placed
    for; while one of them is pending, its content is not collected however long it waits.
    """
    for session_id, sha256 in sorted(holders):
        conn.execute(_HOLD_FOR, {"b_session": session_id, "content": sha256})
    for sha256, size, storage_key in sorted(contents):
        state = _settle(conn, sha256, _MARK_PLACED, {"b_sha256": sha256, "now": now})
        if state is None:
            conn.execute(_NEW_BLOB, {"sha256": sha256, "size": size, "storage_key": storage_key,
                                     "refcount": 0, "created_at": now, "placed_at": now})
        elif state == _COLLECTING:
            raise BlobBusy(sha256)


def record_blob(conn: sa.Connection, sha256: str, size: int, storage_key: str,
                now: float, *, reserved: bool = False) -> str:
    """Count one more use of a committed blob, adding its row on first use (in ``conn``'s
    transaction, together with the asset that uses it). Returns the storage key the blob row
    names: ``storage_key``, or that of the same content stored before.

    ``reserved``: the caller reserved the row before placing the bytes; if it is gone or being
    collected, the placed bytes may be too, and ``BlobCollected`` is raised.
    """
    state = _settle(conn, sha256, _COUNT_USE, {"b_sha256": sha256, "key": storage_key})
    if state == _DONE:
        return str(conn.execute(_STORAGE_KEY, {"b_sha256": sha256}).scalar_one())
    if state is None and not reserved:
        conn.execute(_NEW_BLOB, {"sha256": sha256, "size": size, "storage_key": storage_key,
                                 "refcount": 1, "created_at": now})
        return storage_key
    raise BlobCollected(sha256)


_DONE, _COLLECTING = "done", "collecting"


def _settle(conn: sa.Connection, sha256: str, update: sa.Update,
            params: dict[str, object]) -> str | None:
    """Run ``update`` with ``params`` (conditional on the row not being collected):
    ``_DONE`` if it changed the row, ``_COLLECTING`` if the row is being collected, None if
    there is no row.

    On PostgreSQL each statement sees what was committed before it started, so a row another
    transaction adds between the update and the look that follows is found by the look: the
    update is then run again, and changes it."""
    for _ in range(3):
        if conn.execute(update, params).rowcount == 1:
            return _DONE
        row = conn.execute(_COLLECTOR, {"b_sha256": sha256}).first()
        if row is None:
            return None
        if row.collector is not None:
            return _COLLECTING
    raise RuntimeError(f"blob row {sha256} changes under every update")


def unused_blobs(conn: sa.Connection, placed_before: float, stale_before: float,
                 limit: int) -> list[tuple[str, str]]:
    """``(sha256, storage_key)`` of rows no asset uses that were last placed before
    ``placed_before`` for no upload session still pending, and of those whose collector
    took them before ``stale_before`` and did not finish (it died)."""
    return [(r.sha256, r.storage_key) for r in conn.execute(
        sa.select(blobs.c.sha256, blobs.c.storage_key)
        .where(_collectable(placed_before, stale_before))
        .order_by(blobs.c.sha256).limit(limit)
    )]


def start_collecting(conn: sa.Connection, sha256: str, placed_before: float,
                     stale_before: float, collector: str, now: float) -> bool:
    """Take an unused row for ``collector`` (a token of its own), if it still is one
    ``unused_blobs`` would list. From then on nothing places or commits its content, and
    no other collector takes it until ``now`` is older than their ``stale_before``."""
    marked = conn.execute(
        sa.update(blobs)
        .where(blobs.c.sha256 == sha256, _collectable(placed_before, stale_before))
        .values(collector=collector, collecting_since=now)
    )
    return bool(marked.rowcount == 1)


def stop_collecting(conn: sa.Connection, sha256: str, collector: str) -> None:
    """Give a taken row back (its file could not be deleted): finishes may place it again,
    and a later collection retries it."""
    conn.execute(sa.update(blobs)
                 .where(blobs.c.sha256 == sha256, blobs.c.collector == collector)
                 .values(collector=None, collecting_since=None))


def forget_blob(conn: sa.Connection, sha256: str, collector: str) -> bool:
    """Drop a row ``collector`` took, once its file is deleted; False if another collector
    took it over meanwhile (this one was presumed dead)."""
    gone = conn.execute(sa.delete(blobs).where(blobs.c.sha256 == sha256,
                                               blobs.c.collector == collector,
                                               blobs.c.refcount == 0))
    return bool(gone.rowcount == 1)


def named_blobs(conn: sa.Connection, shas: Sequence[str]) -> set[str]:
    """Those of ``shas`` that have a row."""
    return set(conn.execute(sa.select(blobs.c.sha256).where(blobs.c.sha256.in_(shas)))
               .scalars())


def used_blobs(conn: sa.Connection, after: str, limit: int) -> list[tuple[str, str, int]]:
    """``(sha256, storage_key, size)`` of rows in use, in SHA-256 order after ``after``."""
    return [(r.sha256, r.storage_key, r.size) for r in conn.execute(
        sa.select(blobs.c.sha256, blobs.c.storage_key, blobs.c.size)
        .where(blobs.c.refcount > 0, blobs.c.sha256 > after)
        .order_by(blobs.c.sha256).limit(limit)
    )]


def blob_users(conn: sa.Connection, shas: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(sha256, memory_id, role)`` of the assets that use those contents."""
    return [(r.blob_sha256, r.memory_id, r.role) for r in conn.execute(
        sa.select(assets.c.blob_sha256, assets.c.memory_id, assets.c.role)
        .where(assets.c.blob_sha256.in_(shas))
        .order_by(assets.c.blob_sha256, assets.c.memory_id, assets.c.role)
    )]


def _collectable(placed_before: float, stale_before: float) -> sa.ColumnElement[bool]:
    held = sa.exists().where(upload_sessions.c.placed_sha256 == blobs.c.sha256,
                             upload_sessions.c.state == "pending")
    unused = sa.and_(blobs.c.collector.is_(None), blobs.c.placed_at < placed_before, ~held)
    abandoned = sa.and_(blobs.c.collector.is_not(None),
                        blobs.c.collecting_since < stale_before)
    return sa.and_(blobs.c.refcount == 0, sa.or_(unused, abandoned))
