"""A consistent copy of the embedded SQLite database, taken while servers write to it.

SQLite's online backup copies the database page by page inside one read transaction; under
WAL that never blocks a writer, and the copy is the database as of one commit. Blob files are
immutable and named by content, so copying ``blobs/`` *after* this gives a pair in which every
asset the copy names has its file (docs/deployment.md, "Backups").
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from sqlalchemy.engine import make_url

from memvault.metadata.database import is_sqlite, sync_sqlite_url


class NotSqlite(ValueError):
    """The metadata store is not an SQLite file (PostgreSQL has its own tools)."""


def backup_sqlite(url: str, dest: Path) -> None:
    """Write the database at ``url`` to ``dest`` (atomically replacing it)."""
    if not is_sqlite(url):
        raise NotSqlite(url)
    source = make_url(sync_sqlite_url(url)).database
    if not source or source == ":memory:" or not Path(source).exists():
        raise FileNotFoundError(f"no SQLite database at {source!r}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)
    # Token hashes and everyone's metadata: readable by its owner only, like the database.
    os.close(os.open(partial, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
    with (contextlib.closing(sqlite3.connect(source, timeout=30)) as src,
          contextlib.closing(sqlite3.connect(partial)) as out):
        src.backup(out)
        out.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    os.replace(partial, dest)
    folder = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)
