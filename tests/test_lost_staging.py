"""A pending session whose staged bytes are gone ends, so its client begins again.

After a data folder is restored from a backup (the database copied, ``staging/`` not), or
after something removed a staging file, the session rows still say pending. Told to retry
(503) or answered ``internal`` (500), a client would retry until its budget ran out, and every
attempt would move the session's expiry forward. Instead the session ends as expired (410,
``lost``), its memory goes if begin made it for nothing else, and the same file begun again
uploads whole. A finish that is moving the bytes into place right now is not mistaken for that.

Only where the database lives in the data folder (the embedded default). With the database
elsewhere (PostgreSQL here), a data folder that is not mounted, or is another process's, looks
the same as a restored one, and those sessions are not lost: they keep the old answers (503 to
a chunk), and nothing is ended. Nor while the data folder itself is away (moved, unmounted).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from random import Random

import pytest

from memvault.errors import Expired, Internal, Unavailable
from memvault.hashing import Sha256State
from memvault.sessions import ChunkChecksums
from memvault.settings import Settings
from memvault.storage.base import StagedDamaged, StagedHasher
from memvault.storage.factory import close_blob_store, open_blob_store
from tests.inprocess import CHUNK, InProcess, inprocess, pieces


async def _put(ip: InProcess, session_id: str, data: bytes, index: int) -> None:
    start = index * CHUNK
    chunk = data[start:start + CHUNK]
    await ip.uploads.put_chunk(ip.caller, session_id, index, len(chunk),
                               pieces(chunk, Random(index)), ChunkChecksums())


async def test_a_chunk_for_a_session_whose_staged_bytes_are_gone_ends_it(
    database_url: str | None,
) -> None:
    data = os.urandom(2 * CHUNK + 3)
    async with inprocess(database_url=database_url) as ip:
        session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), "k"))
        await _put(ip, session.id, data, 0)
        os.unlink(ip.staging_dir / session.id)  # the restore did not bring it back

        if database_url is not None:  # the database is not in the data folder
            with pytest.raises(Unavailable):
                await _put(ip, session.id, data, 1)
            assert (await ip.session_row(session.id) or {})["state"] == "pending"
            return
        with pytest.raises(Expired) as lost:
            await _put(ip, session.id, data, 1)
        assert lost.value.extra["lost"] is True
        assert "begin the upload again" in lost.value.detail
        assert (await ip.session_row(session.id) or {})["state"] == "expired"
        memories = await ip.capsules.list_memories(ip.caller, ip.capsule_id)
        assert session.attrs["memory_id"] not in [m.id for m in memories.items], (
            "the memory begin made for it was left empty")

        again, created = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), "k"))
        assert created
        assert again.id != session.id
        for index in range(again.chunk_count):
            await _put(ip, again.id, data, index)
        _, memory = await ip.uploads.finish(ip.caller, again.id, len(data),
                                            hashlib.sha256(data).hexdigest())
        assert await ip.read_asset(memory.assets["original"].storage_key, len(data)) == data


async def test_finishing_a_session_whose_staged_bytes_are_gone_ends_it(
    database_url: str | None,
) -> None:
    data = os.urandom(CHUNK + 5)
    async with inprocess(database_url=database_url) as ip:
        session_id = await ip.sent(data, "k")
        await ip.uploads.sessions.join_hashing(session_id)
        os.unlink(ip.staging_dir / session_id)
        expected = Expired if database_url is None else Internal
        with pytest.raises(expected):
            await ip.uploads.finish(ip.caller, session_id, len(data),
                                    hashlib.sha256(data).hexdigest())
        assert (await ip.session_row(session_id) or {})["state"] == (
            "expired" if database_url is None else "pending")


@pytest.mark.parametrize("cut_to", [0, CHUNK, CHUNK + 2])
async def test_a_staging_file_cut_short_after_every_chunk_was_received_ends_the_session(
    database_url: str | None, cut_to: int,
) -> None:
    """Something truncated a staging file after the server had acknowledged every chunk.
    The finish had answered 500 each time until the TTL (the chunks could not be sent again:
    they count as received); now the session ends, lost, on either database (a file that is
    there but short is damage, whatever the folder's mount), and begun again it uploads."""
    data = os.urandom(CHUNK + 5)
    sha = hashlib.sha256(data).hexdigest()
    async with inprocess(database_url=database_url) as ip:
        session_id = await ip.sent(data, "k")
        await ip.uploads.sessions.join_hashing(session_id)
        os.truncate(ip.staging_dir / session_id, cut_to)
        with pytest.raises(Expired) as lost:
            await ip.uploads.finish(ip.caller, session_id, len(data), sha)
        assert lost.value.extra["lost"] is True
        assert f"{cut_to} bytes where {len(data)} were received" in lost.value.detail
        assert (await ip.session_row(session_id) or {})["state"] == "expired"
        assert not (ip.staging_dir / session_id).exists()

        again = await ip.sent(data, "k")
        assert again != session_id
        _, memory = await ip.uploads.finish(ip.caller, again, len(data), sha)
        assert await ip.read_asset(memory.assets["original"].storage_key, len(data)) == data


async def test_hashing_a_staging_file_cut_short_says_so(tmp_path: Path) -> None:
    """Read back for hashing (the frontier behind), a cut staging file is ``StagedDamaged``
    with where it ends (it was an ``OSError``: a 500 on every finish)."""
    settings = Settings(data_dir=tmp_path)
    store = await open_blob_store(settings)
    try:
        key = await store.stage("ses_cut")
        writer = await store.open_writer(key, 0, length=3 * CHUNK, part=0)
        await writer.write([os.urandom(3 * CHUNK)])
        await writer.close(durable=False)
        os.truncate(tmp_path / "staging" / key, CHUNK + 1)
        assert isinstance(store, StagedHasher)
        with pytest.raises(StagedDamaged) as damaged:
            await store.hash_staged(key, CHUNK, 2 * CHUNK, Sha256State())
        assert damaged.value.why == f"{CHUNK + 1} bytes where {3 * CHUNK} were received"
    finally:
        await close_blob_store(store)


async def test_a_finish_placing_the_bytes_is_not_taken_for_a_loss(
    database_url: str | None,
) -> None:
    """The staging file is gone because a finish has just moved it into place (the session
    notes what it placed): a chunk arriving then is told to send again, as before."""
    data = os.urandom(2 * CHUNK)
    sha = hashlib.sha256(data).hexdigest()
    async with inprocess(database_url=database_url) as ip:
        session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), "k"))
        await _put(ip, session.id, data, 0)
        await ip.uploads.sessions.placements.reserve([(sha, len(data))],
                                                     holders=[(session.id, sha)])
        os.rename(ip.staging_dir / session.id, ip.root / "moved-by-the-finish")
        with pytest.raises(Unavailable):
            await _put(ip, session.id, data, 1)
        assert (await ip.session_row(session.id) or {})["state"] == "pending"


def test_the_rule_holds_only_where_the_database_is_in_the_data_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "data"
    assert Settings(data_dir=data).database_in_data_dir
    assert Settings(data_dir=data,
                    database_url=f"sqlite+aiosqlite:///{data}/memvault.db").database_in_data_dir
    assert not Settings(data_dir=data,
                        database_url=f"sqlite:///{tmp_path}/elsewhere.db").database_in_data_dir
    assert not Settings(data_dir=data,
                        database_url="postgresql+asyncpg://db/memvault").database_in_data_dir
    monkeypatch.chdir(tmp_path)  # a relative data folder names the same place
    assert Settings(data_dir=Path("data"),
                    database_url=f"sqlite:///{data}/memvault.db").database_in_data_dir


async def test_a_data_folder_away_for_a_moment_loses_nothing() -> None:
    """The folder moved (an unmount, a swapped bind mount) while SQLite writes on through its
    open file: a chunk is told to retry (503), not that the session is lost; once the folder
    is back, the same session takes the chunk and finishes."""
    data = os.urandom(2 * CHUNK + 3)
    async with inprocess() as ip:
        session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), "k"))
        await _put(ip, session.id, data, 0)
        root = ip.staging_dir.parent
        away = root.with_name(root.name + ".away")
        root.rename(away)
        try:
            with pytest.raises(Unavailable, match="not in place"):
                await _put(ip, session.id, data, 1)
        finally:
            away.rename(root)
        assert (await ip.session_row(session.id) or {})["state"] == "pending"
        for index in (1, 2):
            await _put(ip, session.id, data, index)
        _, memory = await ip.uploads.finish(ip.caller, session.id, len(data),
                                            hashlib.sha256(data).hexdigest())
        assert await ip.read_asset(memory.assets["original"].storage_key, len(data)) == data
