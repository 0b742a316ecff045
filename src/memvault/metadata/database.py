"""Engines, and the two ways services use them: ``query`` (read) and ``transact`` (write).

A service hands the database a plain function of one SQLAlchemy ``Connection``; the function
runs whole, in one place, and its result comes back to the event loop::

    def _claim(conn: sa.Connection) -> bool: ...
    held = await db.transact(_claim, durable=False)

``transact`` runs the function inside one transaction that commits when it returns and rolls
back when it raises (a typed ``MemvaultError`` raised inside is how a service refuses a
request without leaving anything behind).

On SQLite (the embedded default) the function runs on a database thread with the standard
``sqlite3`` driver: one thread for writes, so writers queue in order instead of colliding on
SQLite's single write lock, and a small pool for reads, which under WAL never wait for the
writer. That is what aiosqlite does per *statement*; doing it per *transaction* makes a write
one hop between the event loop and a thread instead of one per statement, and keeps the
statement-building work off the event loop, which serves every request (docs/decisions.md,
"Metadata on SQLite": it more than halved the per-chunk metadata time).

Elsewhere (PostgreSQL with asyncpg) the function runs through ``AsyncConnection.run_sync``
on an ordinary async pool, where row locks and conditional updates decide races. Under READ
COMMITTED two transactions can both see "no row yet" and both insert it; the unique index lets
one through and the other fails with an integrity error. ``transact`` then runs the loser's
function again, in a new transaction that sees the winner's row and takes the path for "it
exists" (hand back the same session, answer ``conflict``, count one more use). A deadlock
or serialization failure (SQLSTATE 40P01, 40001) is retried the same way: PostgreSQL rolled
the loser back whole. So a transaction function must be re-runnable: it reads and writes
through its connection only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import sqlalchemy as sa
import structlog
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from memvault.aio import uncancelled
from memvault.errors import InsufficientStorage, MemvaultError, Unavailable

T = TypeVar("T")

Work = Callable[[sa.Connection], T]
"""A unit of database work: a plain function of one connection."""

_READ_THREADS = 4
_RACE_RETRIES = 3
_RETRY_STATES = {"40P01", "40001"}
_SERVER_GOING = {"57P01", "57P02", "57P03"}
"""Shut down by an administrator, crashed, or not accepting connections yet."""

log = structlog.get_logger("memvault.metadata")
"""deadlock_detected, serialization_failure: the transaction was rolled back whole."""


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sync_sqlite_url(url: str) -> str:
    """The same SQLite database through the standard-library driver (aiosqlite URLs too)."""
    return make_url(url).set(drivername="sqlite+pysqlite").render_as_string(hide_password=False)


class Database:
    """The metadata store. Create with ``Database.open(url)``; close with ``dispose``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._sqlite = is_sqlite(url)
        self._closed = False
        if self._sqlite:
            sync = sync_sqlite_url(url)
            args = {"check_same_thread": False}
            # No reset on return: every unit ends in an explicit commit or rollback already.
            self._reader = sa.create_engine(sync, pool_size=_READ_THREADS, max_overflow=0,
                                            pool_reset_on_return=None, connect_args=args)
            self._writer = sa.create_engine(sync, pool_size=1, max_overflow=0,
                                            pool_reset_on_return=None, connect_args=args)
            _tune_sqlite(self._reader)
            _tune_sqlite(self._writer)
            self._read_threads = ThreadPoolExecutor(_READ_THREADS, "memvault-db-read")
            self._write_thread = ThreadPoolExecutor(1, "memvault-db-write")
        else:
            self._async: AsyncEngine = create_async_engine(
                url, pool_size=10, max_overflow=20, pool_pre_ping=True
            )

    @classmethod
    def open(cls, url: str) -> Database:
        return cls(url)

    @property
    def dialect(self) -> str:
        return make_url(self.url).get_backend_name()

    async def dispose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sqlite:
            self._write_thread.shutdown(wait=True)
            self._read_threads.shutdown(wait=True)
            self._writer.dispose()
            self._reader.dispose()
        else:
            await self._async.dispose()

    async def query(self, work: Work[T]) -> T:
        """Run ``work`` in one read-only snapshot: every statement in it sees the same commits.

        SQLite's read transaction gives that; on PostgreSQL it is ``REPEATABLE READ READ ONLY``
        (asyncpg sends it with the ``BEGIN``, no extra round trip; a read-only transaction never
        fails to serialise). Under READ COMMITTED a commit could land between two statements of
        one read: a memory's capsule found, the memory then gone, and the read failed.
        """
        if self._sqlite:
            with _writable():
                return await _settle(self._read_threads,
                                     functools.partial(_read, self._reader, work))
        with _reachable():
            async with self._async.connect() as conn:
                await conn.execution_options(isolation_level="REPEATABLE READ",
                                             postgresql_readonly=True)
                return await conn.run_sync(work)

    async def transact(self, work: Work[T], *, durable: bool = True) -> T:
        """Run ``work`` in one write transaction: committed if it returns, rolled back if not.

        ``durable=False`` is for bookkeeping that may be lost to a power failure without harm
        (the client repeats the request): on SQLite its commit skips the WAL fsync. Any later
        durable commit makes it durable too, since the WAL is synced in order.
        """
        if self._sqlite:
            job = functools.partial(_write, self._writer, work, durable)
            with _writable():
                return await _settle(self._write_thread, job)
        with _reachable():
            for attempt in range(_RACE_RETRIES + 1):
                try:
                    async with self._async.begin() as conn:
                        return await conn.run_sync(work)
                except sa.exc.IntegrityError:
                    # A concurrent transaction inserted the same key first (see the module
                    # docstring); a real constraint violation fails the same way again.
                    if attempt == _RACE_RETRIES:
                        raise
                except sa.exc.DBAPIError as exc:
                    if attempt == _RACE_RETRIES or _sqlstate(exc) not in _RETRY_STATES:
                        raise
        raise AssertionError("unreachable")


@contextlib.contextmanager
def _reachable() -> Iterator[None]:
    """Database work whose connection failures are the client's 503 (``_unavailable``), and
    a database that cannot be written (full: 507, read-only: 503) said so (``_unwritable``)
    instead of a bare 500."""
    try:
        yield
    except (sa.exc.DBAPIError, OSError, TimeoutError) as exc:
        typed = _unavailable(exc) or _unwritable(exc)
        if typed is None:
            raise
        raise typed from exc


@contextlib.contextmanager
def _writable() -> Iterator[None]:
    """SQLite work: a database file that cannot take a write said so (``_unwritable``); an
    embedded database is always reachable, so nothing else is mapped."""
    try:
        yield
    except sa.exc.DBAPIError as exc:
        typed = _unwritable(exc)
        if typed is None:
            raise
        raise typed from exc


# SQLite's primary result codes (sqlite3 exceptions carry them as ``sqlite_errorcode``, the
# low byte being the primary code), and PostgreSQL's SQLSTATEs, for a database that cannot
# take a write.
_SQLITE_FULL = 13
_SQLITE_UNWRITABLE = {8: "is read-only", 10: "failed a disk read or write", 14: "cannot be opened"}
_PG_FULL = {"53100", "53000"}  # disk_full, insufficient_resources
_PG_READ_ONLY = "25006"


def _unwritable(exc: Exception) -> MemvaultError | None:
    if not isinstance(exc, sa.exc.DBAPIError):
        return None
    code = getattr(exc.orig, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    state = _sqlstate(exc)
    if primary == _SQLITE_FULL or state in _PG_FULL:
        log.error("database.full", error=f"{exc.orig}"[:300])
        return InsufficientStorage(
            "the metadata database's volume is full; try again once space is freed",
            limit_name="database_space", retry_after=60)
    why = _SQLITE_UNWRITABLE.get(primary or -1) or (
        "is read-only" if state == _PG_READ_ONLY else None)
    if why is None:
        return None
    log.error("database.unwritable", error=f"{exc.orig}"[:300])
    return Unavailable(f"the metadata database {why} right now; try again", retry_after=5)


def _unavailable(exc: Exception) -> Unavailable | None:
    """A 503 for a database that cannot be reached or dropped the connection (the client
    tries again once it is back); None for anything else, which stays what it is."""
    lost = isinstance(exc, OSError | TimeoutError)
    if isinstance(exc, sa.exc.DBAPIError):
        state = _sqlstate(exc) or ""
        cause = exc.orig
        lost = (exc.connection_invalidated or state.startswith("08") or state in _SERVER_GOING
                or isinstance(cause, OSError | TimeoutError)
                or (isinstance(exc, sa.exc.InterfaceError) and _closed(cause)))
    if not lost:
        return None
    log.warning("database.unreachable", error=f"{type(exc).__name__}: {exc}"[:300])
    return Unavailable("the metadata database cannot be reached right now; try again",
                       retry_after=5)


def _closed(cause: BaseException | None) -> bool:
    """asyncpg's "connection is closed" and ConnectionDoesNotExistError; not its other
    interface errors (e.g. "another operation is in progress", which is a bug here)."""
    text = str(cause).lower()
    return (type(cause).__name__ == "ConnectionDoesNotExistError"
            or ("connection" in text and "closed" in text))


def _sqlstate(exc: sa.exc.DBAPIError) -> str | None:
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return str(code) if code is not None else None


async def _settle(pool: ThreadPoolExecutor, job: Callable[[], T]) -> T:
    """Run ``job`` on ``pool``; if the caller is cancelled, still wait for it to end: a
    thread cannot be interrupted, so a transaction that started will finish (commit or roll
    back) whatever happens to the request."""
    return await uncancelled(asyncio.get_running_loop().run_in_executor(pool, job))


def _read(engine: sa.Engine, work: Work[T]) -> T:
    with engine.connect() as conn:
        try:
            # One snapshot for every statement of ``work``.
            conn.exec_driver_sql("BEGIN")
            return work(conn)
        finally:
            conn.rollback()


def _write(engine: sa.Engine, work: Work[T], durable: bool) -> T:
    with engine.connect() as conn:
        _set_synchronous(conn, "FULL" if durable else "NORMAL")
        with conn.begin():
            # The write lock up front, so a transaction never fails half-way on it.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            return work(conn)


def _set_synchronous(conn: sa.Connection, level: str) -> None:
    """Per-transaction durability on SQLite, set outside the transaction (as SQLite requires)."""
    if conn.info.get("synchronous") == level:
        return
    driver = conn.connection.driver_connection
    assert driver is not None
    driver.execute(f"PRAGMA synchronous={level}")
    conn.info["synchronous"] = level


def _tune_sqlite(engine: sa.Engine) -> None:
    # A pool event: a connection event (such as "begin") would make SQLAlchemy dispatch
    # events around every statement; ``_read`` and ``_write`` send BEGIN themselves instead.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from the driver so BEGIN is ours.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit that finish() acknowledged survives power loss, not just a crash.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()
