"""The frontier hand-off channel on a real PostgreSQL: what one transaction announces, every
listener hears on commit (never on rollback), and a listener whose connection is cut
reconnects and hears the next announcements."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from memvault.sessions.handoff import FrontierListener, ListenUnavailable, announce, parse


class Rollback(Exception):
    pass


async def _announce(url: str, *moves: tuple[str, str, int], commit: bool = True) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            for session_id, key, offset in moves:
                # At the end of the upload (offset == size) a move is always announced.
                await conn.run_sync(announce, session_id, key, offset, offset)
            if not commit:
                raise Rollback
    except Rollback:
        pass
    finally:
        await engine.dispose()


Move = tuple[str, str, int]


async def _heard(got: asyncio.Queue[Move], within: float = 10) -> Move:
    return await asyncio.wait_for(got.get(), within)


def test_announcements_reach_every_listener_on_commit_only(postgres_url: str) -> None:
    async def scenario() -> None:
        first: asyncio.Queue[Move] = asyncio.Queue()
        second: asyncio.Queue[Move] = asyncio.Queue()
        listeners = [
            FrontierListener(postgres_url, lambda *m: first.put_nowait(m)),
            FrontierListener(postgres_url, lambda *m: second.put_nowait(m)),
        ]
        for listener in listeners:
            await listener.start()
        try:
            await _announce(postgres_url, ("s-rolled-back", "k:1", 5), commit=False)
            await _announce(postgres_url, ("s1", "name:upload-id", 5242880))
            # Only the committed move arrives, at both, intact.
            assert await _heard(first) == ("s1", "name:upload-id", 5242880)
            assert await _heard(second) == ("s1", "name:upload-id", 5242880)
            await asyncio.sleep(0.2)
            assert first.empty()
            assert second.empty()
        finally:
            for listener in listeners:
                await listener.close()

    asyncio.run(scenario())


def test_a_listener_whose_connection_is_cut_reconnects(postgres_url: str) -> None:
    async def scenario() -> None:
        got: asyncio.Queue[Move] = asyncio.Queue()
        listener = FrontierListener(postgres_url, lambda *m: got.put_nowait(m), retry=0.1)
        await listener.start()
        engine = create_async_engine(postgres_url)
        try:
            async with engine.begin() as conn:
                cut = await conn.execute(sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ))
                assert cut.scalar_one() >= 1
            # Keep announcing until the reconnected listener hears one (each is a new
            # transaction; those sent while it was away are lost, as documented).
            for attempt in range(100):
                await _announce(postgres_url, ("s2", "k:2", attempt))
                try:
                    heard = await _heard(got, within=0.2)
                except TimeoutError:
                    continue
                assert heard[:2] == ("s2", "k:2")
                break
            else:
                pytest.fail("the listener never heard an announcement after its connection was cut")
        finally:
            await engine.dispose()
            await listener.close()

    asyncio.run(scenario())


def test_announcing_on_sqlite_is_a_no_op_and_payloads_parse_back() -> None:
    engine = sa.create_engine("sqlite://")
    with engine.begin() as conn:
        announce(conn, "s", "k", 1, 1)  # no pg_notify there: must not execute anything
    engine.dispose()
    assert parse("abc 42 name:with spaces") == ("abc", "name:with spaces", 42)
    with pytest.raises(ValueError, match="invalid literal"):
        parse("abc notanumber k")
    with pytest.raises(ValueError, match="not enough values"):
        parse("garbage")


def test_a_listener_that_cannot_connect_says_which_setting_to_fix() -> None:
    listener = FrontierListener("postgresql+asyncpg://memvault:s3cret@127.0.0.1:1/db",
                                lambda *m: None)
    with pytest.raises(ListenUnavailable) as info:
        asyncio.run(listener.start())
    message = str(info.value)
    assert "MEMVAULT_LISTEN_DATABASE_URL" in message
    assert "127.0.0.1:1/db" in message
    assert "s3cret" not in message
