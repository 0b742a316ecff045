"""Schema migrations: ``upgrade`` to head, and ``pending`` to refuse a stale schema.

Alembic's own runner is synchronous and starts its own event loop, so the async callers here
run it in a worker thread.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

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


async def upgrade(url: str) -> None:
    """Bring the schema at ``url`` to the newest revision."""
    await asyncio.to_thread(command.upgrade, _config(url), "head")


async def current_revision(db: Database) -> str | None:
    def _read(conn: Connection) -> str | None:
        return MigrationContext.configure(conn).get_current_revision()

    return await db.query(_read)


async def is_current(db: Database) -> bool:
    return await current_revision(db) == head_revision()
