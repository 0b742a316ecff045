"""Bytes placed for a commit that never came are collected, and never bytes someone uses.

finish moves a verified upload to its content address, then commits. If the session is
aborted in between (or the process dies, or the commit is refused), the local folder keeps a
file no row would ever name. The blob row reserved before the move finds it: after the grace
period the reaper's ``collect`` deletes it. Each test drives the steps in one order that a
real interleaving can take, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.util import await_only

from memvault.errors import MemvaultError, Unavailable
from memvault.metadata import Database
from memvault.metadata.blobs import (
    forget_blob,
    record_blob,
    reserve_blobs,
    start_collecting,
    unused_blobs,
)
from memvault.metadata.migrate import upgrade
from memvault.metadata.schema import blobs
from memvault.placement import GRACE, LEASE, Placements
from memvault.sessions import FinishItem
from memvault.storage import local as local_store
from memvault.storage.local import LocalBlobStore
from tests.inprocess import CHUNK, InProcess, inprocess

Confirm = Callable[[], Awaitable[bool]]


@contextlib.contextmanager
def _instead(store: Any, name: str, replacement: Callable[..., Any]) -> Iterator[None]:
    """The store's method ``name`` is ``replacement`` inside the block (which may call the
    original, taken before it): one interleaving of the real store, driven in order."""
    original = getattr(store, name)
    setattr(store, name, replacement)
    try:
        yield
    finally:
        setattr(store, name, original)


async def _row(ip: InProcess, sha: str) -> dict[str, Any] | None:
    query = sa.select(blobs).where(blobs.c.sha256 == sha)
    row = await ip.db.query(lambda conn: conn.execute(query).mappings().first())
    return dict(row) if row is not None else None


def _file(ip: InProcess, sha: str) -> bool:
    assert isinstance(ip.store, LocalBlobStore)
    return ip.store.blob_path(ip.store.blob_key(sha)).exists()


async def _collect(ip: InProcess) -> int:
    count = await ip.uploads.sessions.placements.collect()
    assert isinstance(ip.store, LocalBlobStore)
    await ip.store.drained()  # the unlinks it started
    return count


async def _placed_then_aborted(ip: InProcess, data: bytes, key: str) -> str:
    """A finish whose session is aborted after its bytes are in place, before its commit."""
    session_id = await ip.sent(data, key)
    store = ip.uploads.sessions.store
    commit = store.commit

    async def place_then_abort(staging: str, sha256: str, size: int) -> str:
        stored = await commit(staging, sha256, size)
        await ip.uploads.abort(ip.caller, session_id)
        return stored

    with _instead(store, "commit", place_then_abort), pytest.raises(MemvaultError):
        await ip.uploads.finish(ip.caller, session_id, len(data),
                                hashlib.sha256(data).hexdigest())
    return session_id


async def _orphan_past_grace(ip: InProcess, size: int) -> tuple[bytes, str]:
    """New bytes placed for a finish that never committed, the grace period over: ready to
    be collected. Returns them and their SHA-256."""
    data = os.urandom(size)
    await _placed_then_aborted(ip, data, "orphan")
    ip.clock.advance(GRACE + 1)
    return data, hashlib.sha256(data).hexdigest()


async def test_bytes_no_commit_came_to_use_are_collected_after_the_grace_period(
    database_url: str | None,
) -> None:
    data = os.urandom(2 * CHUNK + 3)
    sha = hashlib.sha256(data).hexdigest()
    async with inprocess(database_url=database_url) as ip:
        await _placed_then_aborted(ip, data, "orphan")
        row = await _row(ip, sha)
        assert row is not None
        assert row["refcount"] == 0, row
        assert _file(ip, sha), "the placed bytes are where finish put them"
        assert await _collect(ip) == 0, "collected before the grace period"
        assert _file(ip, sha)

        ip.clock.advance(GRACE + 1)
        assert await _collect(ip) == 1
        assert not _file(ip, sha)
        assert await _row(ip, sha) is None
        assert await _collect(ip) == 0

        # The same content uploaded again is placed anew and reads back.
        session_id = await ip.sent(data, "again")
        _, memory = await ip.uploads.finish(ip.caller, session_id, len(data), sha)
        asset = memory.assets["original"]
        assert await ip.read_asset(asset.storage_key, len(data)) == data
        assert (await _row(ip, sha) or {})["refcount"] == 1


async def test_bytes_placed_for_a_pending_session_are_kept_while_it_is_pending(
    database_url: str | None,
) -> None:
    """The process died between placing a session's bytes and committing them, and its
    client comes back hours later: the bytes are only in the blob folder now (the staging
    file was renamed), so they are kept until the session ends, then collected."""
    data = os.urandom(2 * CHUNK)
    sha = hashlib.sha256(data).hexdigest()
    async with inprocess(database_url=database_url, session_ttl=4 * GRACE) as ip:
        kept = await ip.sent(data, "kept")
        ended = await ip.sent(data[::-1], "ended")
        for session_id, content in ((kept, data), (ended, data[::-1])):
            # What the dead process did: reserve, then move the bytes into place.
            digest = hashlib.sha256(content).hexdigest()
            await ip.uploads.sessions.placements.reserve([(digest, len(content))],
                                                         holders=[(session_id, digest)])
            await ip.store.commit(session_id, digest, len(content))
        assert ip.staged_files() == set()
        await ip.uploads.abort(ip.caller, ended)

        ip.clock.advance(2 * GRACE)
        assert await _collect(ip) == 1, "only the aborted session's bytes go"
        assert not _file(ip, hashlib.sha256(data[::-1]).hexdigest())
        assert _file(ip, sha)
        _, memory = await ip.uploads.finish(ip.caller, kept, len(data), sha)
        assert await ip.read_asset(memory.assets["original"].storage_key, len(data)) == data


async def test_a_collection_after_a_new_placement_leaves_the_bytes(
    database_url: str | None,
) -> None:
    """The unused row is past its grace period when a new finish of the same content places
    the bytes again; a collection between that placement and its commit keeps them."""
    async with inprocess(database_url=database_url) as ip:
        data, sha = await _orphan_past_grace(ip, CHUNK + 11)
        session_id = await ip.sent(data, "second")
        store = ip.uploads.sessions.store
        commit = store.commit
        collected: list[int] = []

        async def collect_then_place(staging: str, sha256: str, size: int) -> str:
            collected.append(await _collect(ip))
            return await commit(staging, sha256, size)

        with _instead(store, "commit", collect_then_place):
            _, memory = await ip.uploads.finish(ip.caller, session_id, len(data), sha)
        assert collected == [0]
        assert await ip.read_asset(memory.assets["original"].storage_key, len(data)) == data
        ip.clock.advance(GRACE + 1)
        assert await _collect(ip) == 0, "a blob in use is never collected"
        assert await ip.read_asset(memory.assets["original"].storage_key, len(data)) == data


async def test_a_finish_during_a_collection_is_told_to_retry_and_then_commits(
    database_url: str | None,
) -> None:
    """A joint finish that includes the same content arrives while the collector deletes the
    file: it answers ``unavailable`` with Retry-After, naming that upload, and keeps both
    sessions; retried, it commits the bytes."""
    data, other = os.urandom(CHUNK), os.urandom(CHUNK + 9)
    sha = hashlib.sha256(data).hexdigest()
    async with inprocess(database_url=database_url) as ip:
        await _placed_then_aborted(ip, data, "orphan")
        ip.clock.advance(GRACE + 1)
        session_id, other_id = await ip.sent(data, "during"), await ip.sent(other, "other")
        items = [FinishItem(other_id, len(other), hashlib.sha256(other).hexdigest()),
                 FinishItem(session_id, len(data), sha)]
        assert isinstance(ip.store, LocalBlobStore)
        delete = ip.store.delete_blob
        refused: list[BaseException] = []

        async def finish_then_delete(storage_key: str, confirm: Confirm) -> bool:
            try:
                await ip.uploads.finish_many(ip.caller, items)
            except MemvaultError as exc:
                refused.append(exc)
            return await delete(storage_key, confirm)

        with _instead(ip.store, "delete_blob", finish_then_delete):
            assert await _collect(ip) == 1
        assert len(refused) == 1, refused
        assert isinstance(refused[0], Unavailable), refused
        assert refused[0].headers() == {"Retry-After": "1"}
        assert refused[0].extra["upload_id"] == session_id
        for sid in (session_id, other_id):
            assert (await ip.session_row(sid) or {})["state"] == "pending"
        assert ip.staged_files() == {session_id, other_id}, "the sessions' bytes are untouched"

        done = await ip.uploads.finish_many(ip.caller, items)
        memory = await ip.capsules.get_memory(ip.caller, done[1][0].attrs["memory_id"])
        assert await ip.read_asset(memory.assets["original"].storage_key, len(data)) == data


async def test_a_row_another_collector_holds_is_left_to_it_until_its_lease_ends(
    database_url: str | None,
) -> None:
    """A collector that died after taking the row (its file may or may not be gone) leaves
    it taken: other collections leave it alone for the lease, then one finishes the job."""
    async with inprocess(database_url=database_url) as ip:
        _, sha = await _orphan_past_grace(ip, CHUNK + 1)
        now = ip.clock.now()
        assert await ip.db.transact(lambda conn: start_collecting(
            conn, sha256=sha, placed_before=now - GRACE, stale_before=now - LEASE,
            collector="dead", now=now))
        ip.clock.advance(LEASE - 1)
        assert await _collect(ip) == 0, "taken over before the lease ended"
        assert (await _row(ip, sha) or {})["collector"] == "dead"
        assert _file(ip, sha)
        ip.clock.advance(2)
        assert await _collect(ip) == 1
        assert not _file(ip, sha)
        assert await _row(ip, sha) is None


async def test_a_collector_that_looked_before_another_finished_takes_nothing_new(
    database_url: str | None,
) -> None:
    """Two reapers list the same unused row; the first deletes it, then a finish places and
    commits the same content anew; the second's take finds a different row (placed since its
    cutoff, in use) and deletes nothing. (Found by review: when a second collector could take
    a row the first had taken, it deleted the new file under the committed asset.)"""
    async with inprocess(database_url=database_url) as ip:
        data, sha = await _orphan_past_grace(ip, CHUNK + 5)
        now = ip.clock.now()
        looked = await ip.db.query(lambda conn: unused_blobs(
            conn, placed_before=now - GRACE, stale_before=now - LEASE, limit=10))
        assert [s for s, _ in looked] == [sha]

        async def take(collector: str) -> bool:
            return await ip.db.transact(lambda conn: start_collecting(
                conn, sha256=sha, placed_before=now - GRACE, stale_before=now - LEASE,
                collector=collector, now=now))

        # Meanwhile the first collector takes the same row: the second cannot take it now.
        assert await take("first")
        assert not await take("second")
        assert await ip.db.transact(lambda conn: forget_blob(conn, sha, "first"))
        session_id = await ip.sent(data, "late")
        _, memory = await ip.uploads.finish(ip.caller, session_id, len(data), sha)
        assert not await take("second")
        assert not await ip.db.transact(lambda conn: forget_blob(conn, sha, "second"))
        assert await ip.read_asset(memory.assets["original"].storage_key, len(data)) == data


async def test_a_file_that_cannot_be_deleted_is_given_back(database_url: str | None) -> None:
    """The delete fails: the row is given back at once (a finish of the content is not
    refused while the file stays) and the next collection tries again."""
    async with inprocess(database_url=database_url) as ip:
        _, sha = await _orphan_past_grace(ip, CHUNK + 2)

        async def failing(storage_key: str, confirm: Confirm) -> bool:
            raise PermissionError(13, "Permission denied", storage_key)

        with _instead(ip.store, "delete_blob", failing):
            assert await _collect(ip) == 0
        row = await _row(ip, sha)
        assert row is not None
        assert (row["collector"], row["refcount"]) == (None, 0)
        assert _file(ip, sha)
        assert await _collect(ip) == 1
        assert not _file(ip, sha)


async def test_each_take_is_stamped_with_its_own_time(database_url: str | None) -> None:
    """A collection whose first delete took longer than the lease takes the next row now:
    another reaper starting at that moment leaves that row alone. (Found by review: stamped
    with the time the collection began, it counted as abandoned the moment it was taken.)"""
    contents = [os.urandom(CHUNK + n) for n in (1, 2)]
    async with inprocess(database_url=database_url) as ip:
        for n, data in enumerate(contents):
            await _placed_then_aborted(ip, data, f"orphan-{n}")
        ip.clock.advance(GRACE + 1)
        assert isinstance(ip.store, LocalBlobStore)
        delete = ip.store.delete_blob
        other = Placements(ip.db, ip.store, ip.clock)  # another server's reaper
        deletes: list[str] = []
        taken_over: list[int] = []

        async def slow_then_watched(storage_key: str, confirm: Confirm) -> bool:
            deletes.append(storage_key)
            if len(deletes) == 1:
                ip.clock.advance(LEASE + 1)  # this delete took longer than the lease
            elif len(deletes) == 2:
                taken_over.append(await other.collect())
            return await delete(storage_key, confirm)

        with _instead(ip.store, "delete_blob", slow_then_watched):
            assert await _collect(ip) == 2
        assert taken_over == [0]
        assert len(deletes) == 2


async def _place_and_commit_again(ip: InProcess, data: bytes, key: str) -> str:
    """A later upload of the same content, finished: returns the asset's storage key."""
    session_id = await ip.sent(data, key)
    _, memory = await ip.uploads.finish(ip.caller, session_id, len(data),
                                        hashlib.sha256(data).hexdigest())
    return memory.assets["original"].storage_key


@pytest.mark.parametrize("stall", ["before the move", "between the move and the row"])
async def test_a_collector_that_stood_still_past_its_lease_leaves_committed_bytes(
    database_url: str | None, stall: str,
) -> None:
    """A collector takes a row, then stands still for longer than the lease (a paused VM);
    another reaper takes the row over and deletes the file, and the same content is uploaded
    and committed again. When the first one goes on, it must not delete the new file: it
    moves it aside, finds the row is no longer its own, and puts it back (or, if it had moved
    the old file aside before the stall, puts that back over the new copy: the same bytes)."""
    async with inprocess(database_url=database_url) as ip:
        data, sha = await _orphan_past_grace(ip, CHUNK + 7)
        assert isinstance(ip.store, LocalBlobStore)
        delete = ip.store.delete_blob
        other = Placements(ip.db, ip.store, ip.clock)  # another server's reaper
        keys: list[str] = []
        seen: dict[str, Any] = {}

        async def meanwhile() -> None:
            ip.clock.advance(LEASE + 1)
            seen["taken over"] = await other.collect()
            keys.append(await _place_and_commit_again(ip, data, "again"))

        async def stalled(storage_key: str, confirm: Confirm) -> bool:
            if seen:  # the other reaper's own delete
                return await delete(storage_key, confirm)
            seen["stalled"] = True
            if stall == "before the move":
                await meanwhile()
                return await delete(storage_key, confirm)

            async def late_confirm() -> bool:
                await meanwhile()
                return await confirm()

            return await delete(storage_key, late_confirm)

        with _instead(ip.store, "delete_blob", stalled):
            assert await _collect(ip) == 0
        assert seen["taken over"] == 1
        row = await _row(ip, sha)
        assert row is not None
        assert (row["refcount"], row["collector"]) == (1, None)
        assert _file(ip, sha), "the committed asset's bytes were deleted"
        assert await ip.read_asset(keys[0], len(data)) == data
        await ip.store.drained()
        assert list((ip.store.root / "aside").iterdir()) == []


async def test_a_failed_decision_puts_the_file_back_and_gives_the_row_back(
    database_url: str | None,
) -> None:
    """The transaction that drops the row fails (the database went away): the file the
    store moved aside is back in place and the row is free again, so the next collection
    can do it."""
    async with inprocess(database_url=database_url) as ip:
        _, sha = await _orphan_past_grace(ip, CHUNK + 4)
        assert isinstance(ip.store, LocalBlobStore)
        delete = ip.store.delete_blob

        async def database_gone() -> bool:
            assert not _file(ip, sha), "the file is aside while the row is decided"
            raise ConnectionResetError("database went away")

        async def failing_decision(storage_key: str, confirm: Confirm) -> bool:
            return await delete(storage_key, database_gone)

        with _instead(ip.store, "delete_blob", failing_decision):
            assert await _collect(ip) == 0
        assert _file(ip, sha)
        row = await _row(ip, sha)
        assert row is not None
        assert (row["collector"], row["refcount"]) == (None, 0)
        assert list((ip.store.root / "aside").iterdir()) == []
        assert await _collect(ip) == 1
        assert not _file(ip, sha)


@pytest.mark.parametrize("when", ["moving the file aside", "deciding", "the row dropped"])
async def test_a_collection_cancelled_mid_delete_finishes_that_delete_first(
    database_url: str | None, when: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Shutdown cancels the reaper in the middle of one delete. That delete is carried
    through before the cancellation is raised: the file and its row both go. (Found by
    review: a move interrupted by cancellation left the file in aside/ with nobody to put it
    back; a row dropped just before the cancellation came back had its file put back,
    a file no row names.)"""
    async with inprocess(database_url=database_url) as ip:
        _, sha = await _orphan_past_grace(ip, CHUNK + 6)
        assert isinstance(ip.store, LocalBlobStore)
        reached, go_on = asyncio.Event(), threading.Event()
        loop = asyncio.get_running_loop()
        if when == "moving the file aside":
            move = local_store._move

            def slow_move(path: Path, to: Path) -> bool:
                loop.call_soon_threadsafe(reached.set)
                go_on.wait(10)
                return move(path, to)

            monkeypatch.setattr(local_store, "_move", slow_move)
            replaced: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        else:
            delete = ip.store.delete_blob

            async def slow_decision(storage_key: str, confirm: Confirm) -> bool:
                async def decide() -> bool:
                    if when == "the row dropped":
                        dropped = await confirm()
                        reached.set()
                        await asyncio.to_thread(go_on.wait, 10)
                        return dropped
                    reached.set()
                    await asyncio.to_thread(go_on.wait, 10)
                    return await confirm()

                return await delete(storage_key, decide)

            replaced = _instead(ip.store, "delete_blob", slow_decision)
        with replaced:
            collection = asyncio.create_task(ip.uploads.sessions.placements.collect())
            await reached.wait()
            collection.cancel()
            go_on.set()
            with pytest.raises(asyncio.CancelledError):
                await collection
        await ip.store.drained()
        assert not _file(ip, sha)
        assert await _row(ip, sha) is None
        assert list((ip.store.root / "aside").iterdir()) == []


async def test_a_cancelled_collection_gives_its_row_back(database_url: str | None) -> None:
    async with inprocess(database_url=database_url) as ip:
        data, sha = await _orphan_past_grace(ip, CHUNK + 3)

        async def shutting_down(storage_key: str, confirm: Confirm) -> bool:
            raise asyncio.CancelledError

        with (_instead(ip.store, "delete_blob", shutting_down),
              pytest.raises(asyncio.CancelledError)):
            await ip.uploads.sessions.placements.collect()
        assert (await _row(ip, sha) or {})["collector"] is None
        session_id = await ip.sent(data, "after")
        _, memory = await ip.uploads.finish(ip.caller, session_id, len(data), sha)
        assert await ip.read_asset(memory.assets["original"].storage_key, len(data)) == data


async def _files_rows_and_damage(ip: InProcess) -> tuple[bytes, bytes, bytes, str]:
    """Three contents: one stored as it should be; one whose file no row names (what a
    version before migration 0004 left after an abort between rename and commit); one in use
    whose file is gone (a disk fault). Returns them and the damaged one's memory id."""
    kept, orphan, lost = (os.urandom(CHUNK + n) for n in (11, 12, 13))
    await _place_and_commit_again(ip, kept, "kept")
    await _placed_then_aborted(ip, orphan, "orphan")
    orphan_sha = hashlib.sha256(orphan).hexdigest()
    await ip.db.transact(lambda conn: conn.execute(
        sa.delete(blobs).where(blobs.c.sha256 == orphan_sha)))
    session_id = await ip.sent(lost, "lost")
    _, memory = await ip.uploads.finish(ip.caller, session_id, len(lost),
                                        hashlib.sha256(lost).hexdigest())
    assert isinstance(ip.store, LocalBlobStore)
    os.unlink(ip.store.blob_path(memory.assets["original"].storage_key))
    return kept, orphan, lost, str(memory.id)


async def test_check_registers_files_no_row_names_and_lists_assets_without_bytes(
    database_url: str | None,
) -> None:
    async with inprocess(database_url=database_url) as ip:
        kept, orphan, lost, lost_memory = await _files_rows_and_damage(ip)
        orphan_sha = hashlib.sha256(orphan).hexdigest()
        placements = ip.uploads.sessions.placements

        report = await placements.check(batch=2)  # several pages of rows
        assert (report.files, report.in_use) == (2, 2)
        assert report.registered == [orphan_sha]
        assert report.missing == [(hashlib.sha256(lost).hexdigest(), lost_memory, "original")]
        row = await _row(ip, orphan_sha)
        assert row is not None
        assert (row["refcount"], row["size"]) == (0, len(orphan))

        # Registered, the orphan goes the way of any unused placement: after the grace.
        assert await _collect(ip) == 0
        assert _file(ip, orphan_sha)
        ip.clock.advance(GRACE + 1)
        assert await _collect(ip) == 1
        assert not _file(ip, orphan_sha)
        assert _file(ip, hashlib.sha256(kept).hexdigest())
        again = await placements.check()
        assert (again.files, again.registered, len(again.missing)) == (1, [], 1)


async def test_check_keeps_the_bytes_an_old_version_placed_for_a_pending_session(
    database_url: str | None,
) -> None:
    """A version before migration 0004 moved a session's verified bytes into place, then
    died before its commit: no row, and the session does not record what it placed. Its
    client's retried finish needs that file. The check registers it held by that session
    (found by its fully hashed state), so it is kept while the session is pending, and the
    retry commits. (Found by review: registered as unused, it was collected.)"""
    data = os.urandom(2 * CHUNK + 9)
    sha = hashlib.sha256(data).hexdigest()
    async with inprocess(database_url=database_url, session_ttl=4 * GRACE) as ip:
        session_id = await ip.sent(data, "old")
        await ip.uploads.sessions.join_hashing(session_id)
        await ip.store.commit(session_id, sha, len(data))  # what the old finish did
        assert ip.staged_files() == set()
        assert await _row(ip, sha) is None

        report = await ip.uploads.sessions.placements.check()
        assert report.registered == [sha]
        assert (await ip.session_row(session_id) or {})["placed_sha256"] == sha
        ip.clock.advance(2 * GRACE)
        assert await _collect(ip) == 0
        assert _file(ip, sha)
        _, memory = await ip.uploads.finish(ip.caller, session_id, len(data), sha)
        assert await ip.read_asset(memory.assets["original"].storage_key, len(data)) == data


def test_blobs_check_command_reports_and_exits_1_on_missing_bytes(tmp_path: Path) -> None:
    async def damaged() -> tuple[bytes, bytes, bytes, str]:
        async with inprocess(root=tmp_path) as ip:
            return await _files_rows_and_damage(ip)

    _, orphan, lost, lost_memory = asyncio.run(damaged())
    command = [sys.executable, "-m", "memvault", "blobs", "check", "--data", str(tmp_path)]
    done = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout) == {
        "files": 2, "in_use": 2, "registered": [hashlib.sha256(orphan).hexdigest()],
        "missing": [{"sha256": hashlib.sha256(lost).hexdigest(), "memory_id": lost_memory,
                     "role": "original"}],
        "damaged": [], "verified": None, "corrupt": [],
    }
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stdout.splitlines() == ["2 blob files, 2 blobs in use"]
    assert f"the original of memory {lost_memory}" in done.stderr
    assert "upload it again" in done.stderr


@pytest.mark.parametrize("step", ["reserve", "record"])
def test_a_row_committed_between_two_statements_is_counted_not_refused(
    postgres_url: str, step: str,
) -> None:
    """On PostgreSQL each statement sees what was committed before it: another transaction's
    new row can appear after an update found nothing and before the look that follows. It is
    a row like any other (first seen in CI, where two finishes of one session at once had
    one answered 503): the update runs again. Driven here by committing the row from a
    second connection right after the first update."""
    sha = hashlib.sha256(step.encode()).hexdigest()
    key = f"blobs/{sha[:2]}/{sha[2:4]}/{sha}"

    async def scenario() -> None:
        await upgrade(postgres_url)
        db = Database.open(postgres_url)
        other = create_async_engine(db.url)

        async def commit_the_row() -> None:
            async with other.begin() as conn:
                await conn.execute(sa.insert(blobs).values(
                    sha256=sha, size=1, storage_key=key, refcount=1, created_at=0.0))

        def work(conn: sa.Connection) -> str:
            fired: list[bool] = []

            def meanwhile(_conn: Any, statement: Any, *_: Any) -> None:
                if not fired and isinstance(statement, sa.Update):
                    fired.append(True)
                    await_only(commit_the_row())

            event.listen(conn, "after_execute", meanwhile)
            if step == "reserve":
                reserve_blobs(conn, [(sha, 1, key)], now=5.0)
                return "reserved"
            return record_blob(conn, sha, 1, key, now=5.0)

        try:
            assert await db.transact(work) in ("reserved", key)
            row = await db.query(lambda conn: conn.execute(
                sa.select(blobs).where(blobs.c.sha256 == sha)).mappings().one())
            assert (row["refcount"], row["placed_at"]) == (
                (1, 5.0) if step == "reserve" else (2, None))
        finally:
            await other.dispose()
            await db.dispose()

    asyncio.run(scenario())
