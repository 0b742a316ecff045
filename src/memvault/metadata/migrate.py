"""Schema migrations: ``upgrade`` to head, and ``schema_state`` to refuse a stale schema.

Alembic's own runner is synchronous and starts its own event loop, so the async callers here
run it in a worker thread. On an SQLite file the upgrade holds an exclusive lock on a file
beside the database, so two processes starting together on a fresh data folder (``serve`` and
``worker``, or two servers) do not both create the tables. A database written by a newer
memvault (a revision these scripts do not know) is ``SchemaTooNew``, never "out of date".
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path
from typing import Literal

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import ResolutionError
from alembic.util import CommandError
from sqlalchemy.engine import Connection, make_url

from memvault.metadata.database import Database, is_sqlite, sync_sqlite_url

_HERE = Path(__file__).parent / "migrations"


def _config(url: str) -> Config:
    if url and is_sqlite(url):
        url = sync_sqlite_url(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    cfg.set_main_option("sqlalchemy.url", url)
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config("")).get_current_head()
    assert head is not None
    return head


class SchemaTooNew(RuntimeError):
    """The database names a schema revision this version does not know."""

    def __init__(self, revision: str) -> None:
        super().__init__(
            f"the database was written by a newer memvault (schema revision {revision!r} is "
            "unknown to this version): run that version, or restore a backup made by this one")


async def upgrade(url: str) -> None:
    """Bring the schema at ``url`` to the newest revision."""
    await asyncio.to_thread(_upgrade, url)


def _upgrade(url: str) -> None:
    lock = _lock_file(url)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600) if lock is not None else None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        command.upgrade(_config(url), "head")
    except CommandError as exc:
        if isinstance(exc.__cause__, ResolutionError):
            raise SchemaTooNew(str(exc.__cause__.argument)) from exc
        raise
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _lock_file(url: str) -> Path | None:
    """Beside an SQLite file; None for other databases (their migrations are run by
    ``memvault db upgrade``, once per release)."""
    if not url or not is_sqlite(url):
        return None
    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    path = Path(database)
    return path.with_name(path.name + ".migrate-lock")


async def current_revision(db: Database) -> str | None:
    def _read(conn: Connection) -> str | None:
        return MigrationContext.configure(conn).get_current_revision()

    return await db.query(_read)


async def schema_state(db: Database) -> Literal["current", "behind", "ahead"]:
    """``ahead`` when the database names a revision these scripts do not know."""
    revision = await current_revision(db)
    if revision == head_revision():
        return "current"
    if revision is None:
        return "behind"
    try:
        ScriptDirectory.from_config(_config("")).get_revision(revision)
    except (ResolutionError, CommandError):
        return "ahead"
    return "behind"


async def is_current(db: Database) -> bool:
    return await schema_state(db) == "current"


_TOUCH_VERSION = sa.text("UPDATE alembic_version SET version_num = version_num")


async def probe_write(db: Database) -> None:
    """Commit a real write, which changes nothing and grows nothing: the one row of the
    schema's version table set to itself. Raises what the database raises when it takes no
    writes (an SQLite file opened read-only, a full or read-only volume, a PostgreSQL
    standby or a ``default_transaction_read_only`` database), which reading cannot show.
    On PostgreSQL it waits at most a second for the row's lock (held by a migration)."""
    def touch(conn: Connection) -> None:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SET LOCAL lock_timeout = '1s'"))
        conn.execute(_TOUCH_VERSION)

    await db.transact(touch)
