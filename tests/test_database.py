"""Transactions on SQLite: all or nothing, durability per transaction, settled on cancel."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from memvault.errors import Conflict, InsufficientStorage, Unavailable
from memvault.metadata import Database
from memvault.metadata.migrate import is_current, upgrade
from memvault.metadata.schema import principals


async def _open(tmp_path: Path, driver: str = "sqlite") -> Database:
    url = f"{driver}:///{tmp_path / 'm.db'}"
    await upgrade(url)
    return Database.open(url)


def _principal(n: int) -> dict[str, object]:
    return {"id": f"prn_{n}", "name": f"p{n}", "is_admin": False, "created_at": 0.0}


def _count(conn: sa.Connection) -> int:
    return len(conn.execute(sa.select(principals)).all())


async def test_transaction_commits_on_return_and_rolls_back_on_error(tmp_path: Path) -> None:
    db = await _open(tmp_path)
    try:
        assert await is_current(db)

        def insert_then_refuse(conn: sa.Connection) -> None:
            conn.execute(sa.insert(principals).values(**_principal(1)))
            raise Conflict("refused after writing")

        with pytest.raises(Conflict):
            await db.transact(insert_then_refuse)
        assert await db.query(_count) == 0

        await db.transact(lambda conn: conn.execute(sa.insert(principals).values(**_principal(2))))
        assert await db.query(_count) == 1
    finally:
        await db.dispose()


def _insert_elsewhere(path: Path, n: int) -> None:
    """Insert a principal through a connection of its own that waits for no lock."""
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("INSERT INTO principals (id, name, is_admin, created_at) "
                      "VALUES (?, ?, 0, 0.0)", (f"prn_{n}", f"p{n}"))
    finally:
        other.close()


async def test_a_read_sees_one_snapshot(tmp_path: Path) -> None:
    db = await _open(tmp_path)
    try:
        def count_twice(conn: sa.Connection) -> tuple[int, int]:
            first = _count(conn)
            _insert_elsewhere(tmp_path / "m.db", 1)  # committed between the two statements
            return first, _count(conn)

        assert await db.query(count_twice) == (0, 0)
        assert await db.query(_count) == 1
    finally:
        await db.dispose()


async def test_a_write_transaction_holds_the_write_lock_from_its_start(tmp_path: Path) -> None:
    db = await _open(tmp_path)
    try:
        def read_then_let_another_write(conn: sa.Connection) -> None:
            _count(conn)  # only a read so far: a deferred transaction would not hold the lock
            _insert_elsewhere(tmp_path / "m.db", 1)

        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await db.transact(read_then_let_another_write)
        assert await db.query(_count) == 0
    finally:
        await db.dispose()


async def test_aiosqlite_urls_still_open(tmp_path: Path) -> None:
    """Configurations written for the earlier async driver keep working."""
    db = await _open(tmp_path, "sqlite+aiosqlite")
    try:
        assert await is_current(db)
        assert await db.query(_count) == 0
    finally:
        await db.dispose()


async def test_durable_transactions_fsync_the_wal_and_bookkeeping_ones_do_not(
    tmp_path: Path,
) -> None:
    db = await _open(tmp_path)

    def pragmas(conn: sa.Connection) -> tuple[int, str]:
        level = conn.execute(sa.text("PRAGMA synchronous")).scalar_one()
        mode = conn.execute(sa.text("PRAGMA journal_mode")).scalar_one()
        return int(level), str(mode)

    try:
        for durable, level in [(False, 1), (True, 2), (False, 1)]:  # 1 = NORMAL, 2 = FULL
            assert await db.transact(pragmas, durable=durable) == (level, "wal")
    finally:
        await db.dispose()


async def test_cancelled_caller_waits_until_the_transaction_is_settled(tmp_path: Path) -> None:
    """A transaction already running when its caller is cancelled ends before the caller does,
    so cleanup that follows the cancellation sees its outcome."""
    db = await _open(tmp_path)
    started, release = threading.Event(), threading.Event()

    def slow_insert(conn: sa.Connection) -> None:
        conn.execute(sa.insert(principals).values(**_principal(3)))
        started.set()
        release.wait(10)

    try:
        task = asyncio.create_task(db.transact(slow_insert))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done(), "the caller returned while its transaction was still open"
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await db.query(_count) == 1
    finally:
        release.set()
        await db.dispose()


async def test_migrations_build_exactly_the_schema_the_code_uses(
    tmp_path: Path, database_url: str | None,
) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from memvault.metadata.schema import metadata

    if database_url is None:
        db = await _open(tmp_path)
    else:
        await upgrade(database_url)
        db = Database.open(database_url)

    def diff(conn: sa.Connection) -> list[object]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))

    try:
        assert await db.query(diff) == []
    finally:
        await db.dispose()


async def test_a_full_database_is_a_507_and_a_read_only_one_a_503(tmp_path: Path) -> None:
    """SQLite refusing a write (its file may not grow: ``max_page_count``, as a full volume
    does; or writes are off: ``query_only``, as on a file system remounted read-only) is a
    typed answer the client can act on, not a bare 500."""
    db = await _open(tmp_path)
    try:
        def fill(conn: sa.Connection) -> None:
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
            conn.exec_driver_sql(f"PRAGMA max_page_count = {pages}")
            for n in range(2000):
                conn.execute(sa.insert(principals).values(**_principal(n)))

        with pytest.raises(InsufficientStorage) as full:
            await db.transact(fill)
        assert full.value.extra["limit_name"] == "database_space"
        assert full.value.retry_after
        assert await db.query(_count) == 0  # nothing of the refused transaction

        def read_only(conn: sa.Connection) -> None:
            conn.exec_driver_sql("PRAGMA max_page_count = 1000000")
            conn.exec_driver_sql("PRAGMA query_only = 1")
            try:
                conn.execute(sa.insert(principals).values(**_principal(1)))
            finally:
                conn.exec_driver_sql("PRAGMA query_only = 0")

        with pytest.raises(Unavailable, match="read-only"):
            await db.transact(read_only)
        await db.transact(lambda conn: conn.execute(sa.insert(principals).values(**_principal(2))))
        assert await db.query(_count) == 1
    finally:
        await db.dispose()
