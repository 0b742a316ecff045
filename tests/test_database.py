"""The unit of work on SQLite: rollback unless committed; durability chosen per transaction."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from memvault.metadata import Database
from memvault.metadata.migrate import is_current, upgrade
from memvault.metadata.schema import principals


async def _open(tmp_path: Path) -> Database:
    url = f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    await upgrade(url)
    return Database.open(url)


async def test_unit_rolls_back_unless_committed(tmp_path: Path) -> None:
    db = await _open(tmp_path)
    try:
        assert await is_current(db)
        row = {"id": "prn_1", "name": "a", "is_admin": False, "created_at": 0.0}
        async with db.unit() as uow:
            await uow.execute(sa.insert(principals).values(**row))
        async with db.read() as conn:
            assert (await conn.execute(sa.select(principals))).all() == []
        async with db.unit() as uow:
            await uow.execute(sa.insert(principals).values(**row))
            await uow.commit()
        async with db.read() as conn:
            assert len((await conn.execute(sa.select(principals))).all()) == 1
    finally:
        await db.dispose()


async def test_durable_units_fsync_the_wal_and_bookkeeping_units_do_not(tmp_path: Path) -> None:
    db = await _open(tmp_path)
    try:
        for durable, level in [(False, 1), (True, 2), (False, 1)]:  # 1 = NORMAL, 2 = FULL
            async with db.unit(durable=durable) as uow:
                got = (await uow.execute(sa.text("PRAGMA synchronous"))).scalar_one()
                assert got == level
                assert (await uow.execute(sa.text("PRAGMA journal_mode"))).scalar_one() == "wal"
    finally:
        await db.dispose()
