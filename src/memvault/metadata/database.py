"""Engines and the unit of work.

SQLite allows one writer at a time. Rather than let concurrent writers collide and retry on
``SQLITE_BUSY``, write transactions go through a separate engine whose pool holds exactly one
connection and which starts every transaction with ``BEGIN IMMEDIATE``: writers queue in the
pool, in-process, fairly. Readers use their own pool and, under WAL, never wait for the writer.
On PostgreSQL both roles use ordinary pools and the row locks and conditional updates in the
services decide races.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine


class UnitOfWork:
    """One write transaction. Leaving the block without ``commit()`` rolls everything back."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self._committed = False

    async def commit(self) -> None:
        await self.conn.commit()
        self._committed = True

    async def execute(self, statement: sa.Executable, *args: Any) -> sa.CursorResult[Any]:
        return await self.conn.execute(statement, *args)


class Database:
    """The metadata store's engines. Create with ``Database.open(url)``; close with ``dispose``."""

    def __init__(self, reader: AsyncEngine, writer: AsyncEngine, url: str) -> None:
        self.reader = reader
        self.writer = writer
        self.url = url
        self._sqlite = writer.dialect.name == "sqlite"

    @property
    def dialect(self) -> str:
        return self.writer.dialect.name

    @classmethod
    def open(cls, url: str) -> Database:
        if url.startswith("sqlite"):
            # No reset on return: every unit ends in an explicit commit or rollback already,
            # and the extra rollback costs a driver round trip per checkout.
            reader = create_async_engine(url, pool_size=8, max_overflow=8,
                                         pool_reset_on_return=None)
            writer = create_async_engine(url, pool_size=1, max_overflow=0, pool_timeout=120,
                                         pool_reset_on_return=None)
            for engine in (reader, writer):
                _tune_sqlite(engine, immediate=engine is writer)
            return cls(reader, writer, url)
        engine = create_async_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)
        return cls(engine, engine, url)

    async def dispose(self) -> None:
        await self.writer.dispose()
        if self.reader is not self.writer:
            await self.reader.dispose()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only connection; each statement sees everything committed before it ran."""
        async with self.reader.connect() as conn:
            yield conn

    @asynccontextmanager
    async def unit(self, *, durable: bool = True) -> AsyncIterator[UnitOfWork]:
        """A write transaction; commit explicitly, anything else rolls back.

        ``durable=False`` is for bookkeeping that may be lost to a power failure without harm
        (the client repeats the request): on SQLite its commit skips the WAL fsync. Any later
        durable commit makes it durable too, since the WAL is synced in order.
        """
        async with self.writer.connect() as conn:
            if self._sqlite:
                await _set_synchronous(conn, "FULL" if durable else "NORMAL")
            await conn.begin()
            uow = UnitOfWork(conn)
            try:
                yield uow
            finally:
                if not uow._committed:
                    await conn.rollback()


async def _set_synchronous(conn: AsyncConnection, level: str) -> None:
    """Per-transaction durability on SQLite, set outside the transaction (as SQLite requires)."""
    if conn.info.get("synchronous") == level:
        return
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    assert driver is not None
    await driver.execute(f"PRAGMA synchronous={level}")
    conn.info["synchronous"] = level


def _tune_sqlite(engine: AsyncEngine, *, immediate: bool) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from the driver so BEGIN is ours (see module docstring).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit that finish() acknowledged survives power loss, not just a crash.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
