"""``memvault db backup``: the embedded database copied while it is in use, and restored.

The documented procedure (docs/deployment.md, "Backups") is: copy the database with the
command, then copy ``blobs/``. Restored side by side, ``memvault blobs check`` must find every
asset's file and nothing stray.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.inprocess import CHUNK, inprocess


def _memvault(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memvault", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def _library(data: Path) -> list[bytes]:
    """Two committed uploads and one still pending, in ``data``."""
    data.mkdir()
    contents = [os.urandom(2 * CHUNK + 5), os.urandom(CHUNK - 1)]

    async def fill() -> None:
        async with inprocess(root=data) as ip:
            for n, content in enumerate(contents):
                session_id = await ip.sent(content, f"kept-{n}")
                await ip.uploads.finish(ip.caller, session_id, len(content),
                                        hashlib.sha256(content).hexdigest())
            await ip.sent(os.urandom(CHUNK), "pending")

    asyncio.run(fill())
    return contents


def test_a_backup_restored_with_the_blobs_names_every_file_and_nothing_more(
    tmp_path: Path,
) -> None:
    data, copy = tmp_path / "data", tmp_path / "backup" / "memvault.db"
    contents = _library(data)

    done = _memvault("db", "backup", str(copy), "--data", str(data))
    assert done.returncode == 0, done.stderr
    assert f"database copied to {copy}" in done.stdout
    with sqlite3.connect(copy) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        assert db.execute("SELECT count(*) FROM assets").fetchone() == (2,)
        assert db.execute("SELECT state, count(*) FROM upload_sessions GROUP BY state "
                          "ORDER BY state").fetchall() == [("committed", 2), ("pending", 1)]
    assert sorted(p.name for p in copy.parent.iterdir()) == ["memvault.db"]
    assert copy.stat().st_mode & 0o777 == 0o600

    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(copy, restored / "memvault.db")
    shutil.copytree(data / "blobs", restored / "blobs")
    done = _memvault("blobs", "check", "--data", str(restored), "--json", "--verify")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"files": 2, "in_use": 2, "registered": [], "missing": [],
                                       "damaged": [], "verified": 2, "corrupt": []}
    for content in contents:
        sha = hashlib.sha256(content).hexdigest()
        assert (restored / "blobs" / sha[:2] / sha[2:4] / sha).read_bytes() == content

    # Run again, the copy is replaced whole.
    assert _memvault("db", "backup", str(copy), "--data", str(data)).returncode == 0
    assert sorted(p.name for p in copy.parent.iterdir()) == ["memvault.db"]


def test_backup_says_what_to_do_when_it_cannot(tmp_path: Path) -> None:
    done = _memvault("db", "backup", str(tmp_path / "b.db"), "--data", str(tmp_path / "none"))
    assert done.returncode == 1
    assert "no SQLite database" in done.stderr
    done = _memvault("db", "backup", str(tmp_path / "b.db"), "--data", str(tmp_path),
                     env={"MEMVAULT_DATABASE_URL": "postgresql+asyncpg://db.invalid/memvault"})
    assert done.returncode == 2
    assert "pg_dump" in done.stderr
    assert not (tmp_path / "b.db").exists()
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    done = _memvault("blobs", "check", "--data", str(a_file))
    assert done.returncode == 2
    assert "is a file; give a folder" in done.stderr


def test_backup_to_a_place_it_cannot_write_says_so(tmp_path: Path) -> None:
    _library(tmp_path / "data")
    (tmp_path / "taken").write_text("a file where the folder would go")
    done = _memvault("db", "backup", str(tmp_path / "taken" / "b.db"),
                     "--data", str(tmp_path / "data"))
    assert done.returncode == 1
    assert done.stderr.startswith(f"memvault: cannot back up to {tmp_path / 'taken' / 'b.db'}")
    assert "Traceback" not in done.stderr
