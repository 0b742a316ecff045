"""What one chunk costs the metadata store: statements, transactions and time, per backend.

Drives the upload service in-process (no HTTP) with small chunks, so the time measured is the
metadata work and not the bytes: 64 KiB chunks, fsync off. Counts every SQL statement and
transaction the database layer runs during begin, the chunks and finish.

    ./run bench metadata                       # SQLite (embedded default)
    ./run bench metadata --postgres postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from _common import print_table
from memvault import logs
from memvault.clock import SystemClock
from memvault.http.app import open_services
from memvault.sessions import ChunkChecksums
from memvault.settings import Settings
from memvault.uploads import BeginRequest

CHUNK = 64 * 1024


def _engines(db: Any) -> list[sa.Engine]:
    if getattr(db, "_sqlite", False):
        return [db._writer, db._reader]
    return [db._async.sync_engine]


class Tally:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def attach(self, engine: sa.Engine) -> None:
        event.listen(engine, "before_cursor_execute", self._statement)
        event.listen(engine, "commit", lambda conn: self.counts.update(["commit"]))

    def _statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        verb = statement.lstrip().split(None, 1)[0].upper()
        self.counts["write" if verb in ("INSERT", "UPDATE", "DELETE") else "read"] += 1

    def take(self) -> Counter[str]:
        taken, self.counts = self.counts, Counter()
        return taken


async def _body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def run(url: str | None, chunks: int, label: str) -> list[Any]:
    with tempfile.TemporaryDirectory(prefix="memvault-bench-meta-") as tmp:
        settings = Settings(data_dir=Path(tmp), database_url=url, chunk_size=CHUNK,
                            min_chunk_size=CHUNK, fsync=False, storage_reserve=0,
                            auto_migrate=True, log_level="warning")
        logs.configure(settings)
        db, services = await open_services(settings, SystemClock())
        try:
            caller, _ = await services.auth.create_principal(f"bench-{secrets.token_hex(3)}")
            capsule = await services.capsules.create_capsule(caller, "bench")
            tally = Tally()
            for engine in _engines(db):
                tally.attach(engine)
            data = os.urandom(chunks * CHUNK)
            request = BeginRequest(capsule_id=capsule["id"], filename="f", size=len(data),
                                   content_type="application/octet-stream",
                                   idempotency_key="k")
            started = time.perf_counter()
            session, _ = await services.uploads.begin(caller, request)
            begin_ms = (time.perf_counter() - started) * 1000
            begin = tally.take()
            times = []
            for index in range(chunks):
                piece = data[index * CHUNK:(index + 1) * CHUNK]
                started = time.perf_counter()
                await services.uploads.put_chunk(caller, session.id, index, len(piece),
                                                 _body(piece), ChunkChecksums())
                times.append((time.perf_counter() - started) * 1000)
            await services.uploads.sessions.join_hashing(session.id)
            per_chunk = tally.take()
            started = time.perf_counter()
            await services.uploads.finish(caller, session.id, len(data),
                                          hashlib.sha256(data).hexdigest())
            finish_ms = (time.perf_counter() - started) * 1000
            finish = tally.take()
        finally:
            await services.uploads.sessions.close()
            await db.dispose()
    return [
        label,
        f"{begin['write']}/{begin['read']}/{begin['commit']}",
        f"{per_chunk['write'] / chunks:.1f}",
        f"{per_chunk['read'] / chunks:.1f}",
        f"{per_chunk['commit'] / chunks:.1f}",
        f"{statistics.median(times):.2f}",
        f"{sorted(times)[int(len(times) * 0.99) - 1]:.2f}",
        f"{begin_ms:.1f}",
        f"{finish['write']}/{finish['read']}/{finish['commit']}",
        f"{finish_ms:.1f}",
    ]


async def create_database(admin_url: str) -> str:
    import asyncpg

    name = f"mvbench_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}"


async def drop_database(admin_url: str, url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=400)
    parser.add_argument("--postgres", help="admin URL of a PostgreSQL server (trust auth)")
    args = parser.parse_args()
    rows = [await run(None, args.chunks, "SQLite (WAL, 1 writer thread)")]
    if args.postgres:
        url = await create_database(args.postgres)
        try:
            rows.append(await run(url, args.chunks, "PostgreSQL (asyncpg)"))
        finally:
            await drop_database(args.postgres, url)
    print(f"{args.chunks} sequential 64 KiB chunks, fsync off, in-process (no HTTP);")
    print("w/r/tx = write statements / read statements / commits")
    print_table(
        ["backend", "begin w/r/tx", "chunk writes", "chunk reads", "chunk tx",
         "chunk ms p50", "chunk ms p99", "begin ms", "finish w/r/tx", "finish ms"],
        rows,
    )


if __name__ == "__main__":
    asyncio.run(main())
