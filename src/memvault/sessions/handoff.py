"""Handing the hash frontier between server processes: PostgreSQL ``LISTEN``/``NOTIFY``.

On an object store, a part that arrived past the hash frontier can be read back before the
upload is sealed only from the spool of the process that received it (an unfinished S3
multipart upload cannot be read). So when any process moves a session's frontier, it
*announces* the new offset on ``CHANNEL`` inside the same transaction: PostgreSQL delivers
the notification when that transaction commits, and never for one that rolls back. Every
server listens. The one holding the part that starts at the new offset hashes it at once
(and announces in turn), and a ``finish`` waiting on a frontier another process is
advancing wakes on each move instead of reading the parts back from the object.

A notification is a hint, never the truth: the frontier itself only moves by
compare-and-set in the database. A lost one (the listener reconnecting, or the process that
held the part has died) costs what the store's read-back costs anyway, once ``finish`` has
waited ``frontier_handoff_wait`` without progress. PostgreSQL only: the embedded SQLite
deployment is one process, and a shared folder can be read by everyone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import make_url

from memvault.metadata.schema import upload_parts

log = structlog.get_logger("memvault.sessions")

CHANNEL = "memvault_frontier"

OnMove = Callable[[str, str, int], None]
"""Told ``(session_id, staging_key, offset)``: that session's frontier now stands at offset."""


def announce(
    conn: sa.Connection, session_id: str, staging_key: str, offset: int, size: int
) -> None:
    """Inside the transaction that moved the frontier to ``offset`` (after its update of the
    session row): tell every listener, on commit, if anyone needs to know.

    Someone does when the part at ``offset`` is already received (its holder can hash it
    now) or the frontier reached the end (a finish may be waiting). Otherwise the part's
    receiver, when it marks it received, finds the frontier at its start and hashes it
    itself: that mark updates the same session row, so it either committed before this
    transaction's update (and the query below sees it) or commits after this one (and sees
    this frontier). So an upload whose chunks arrive in order announces nothing.
    """
    if conn.dialect.name != "postgresql":
        return
    if offset < size:
        waiting = conn.execute(
            sa.select(upload_parts.c.offset).where(
                upload_parts.c.session_id == session_id,
                upload_parts.c.offset == offset,
                upload_parts.c.state == "received",
            )
        ).first()
        if waiting is None:
            return
    payload = f"{session_id} {offset} {staging_key}"
    conn.execute(sa.select(sa.func.pg_notify(CHANNEL, payload)))


def parse(payload: str) -> tuple[str, str, int]:
    """``(session_id, staging_key, offset)`` from an announcement; ``ValueError`` if malformed."""
    session_id, offset, staging_key = payload.split(" ", 2)
    return session_id, staging_key, int(offset)


class ListenUnavailable(RuntimeError):
    """The listening connection could not be made at start (a configuration error)."""


class FrontierListener:
    """Listens on ``CHANNEL`` over a connection of its own and hands each move to ``on_move``.

    ``start`` connects (and raises if it cannot); afterwards a lost connection is re-made in
    the background every ``retry`` seconds until it works, with what was missed meanwhile
    left to finish's read-back. The connection must be a direct one (a pooler in transaction
    mode does not keep ``LISTEN``).
    """

    def __init__(self, database_url: str, on_move: OnMove, *, retry: float = 1.0) -> None:
        url = make_url(database_url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self._shown = url.render_as_string(hide_password=True)
        self._on_move = on_move
        self._retry = retry
        self._conn: Any = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect and listen; ``ListenUnavailable`` saying why if that fails."""
        try:
            await self._connect()
        except Exception as exc:  # wrapped, with the setting to fix, and re-raised
            raise ListenUnavailable(
                f"cannot LISTEN for hash frontier moves on {self._shown}: {exc!r}; it needs a "
                "direct PostgreSQL connection (set MEMVAULT_LISTEN_DATABASE_URL when "
                "MEMVAULT_DATABASE_URL goes through a pooler)"
            ) from exc
        self._task = asyncio.create_task(self._reconnect_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()

    async def _connect(self) -> None:
        import asyncpg  # the PostgreSQL extra

        conn = await asyncpg.connect(self._dsn, timeout=10)
        try:
            conn.add_termination_listener(lambda _conn: self._lost.set())
            await conn.add_listener(CHANNEL, self._heard)
        except BaseException:
            await conn.close()
            raise
        self._lost.clear()
        self._conn = conn

    async def _reconnect_forever(self) -> None:
        import asyncpg

        failures = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
        while True:
            await self._lost.wait()
            log.warning("frontier.listener_lost", retry_seconds=self._retry)
            while True:
                await asyncio.sleep(self._retry)
                try:
                    await self._connect()
                except failures as exc:  # keep trying, and say why
                    log.warning("frontier.listener_reconnect_failed", error=repr(exc))
                    continue
                log.info("frontier.listener_reconnected")
                break

    def _heard(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            session_id, staging_key, offset = parse(payload)
        except ValueError:
            log.warning("frontier.bad_announcement", payload=payload[:200])
            return
        self._on_move(session_id, staging_key, offset)
