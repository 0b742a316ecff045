"""The SDK against the real app in-process (``httpx.ASGITransport``): fast, no sockets.

Faults a network would cause are injected by ``tests.faults.FaultTransport`` between the SDK
and the app; everything behind it (sessions, hashing, storage, SQLite) is the real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import os
import signal
import sqlite3
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from memvault.client import (
    AsyncClient,
    BadResponse,
    ChecksumMismatch,
    Conflict,
    ConnectionFailed,
    FileChanged,
    Forbidden,
    InvalidArgument,
    MemvaultError,
    NotFound,
    Progress,
    ResourceExhausted,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
    UploadMemoryError,
)
from memvault.client.download import part_path
from memvault.client.source import FINGERPRINT_BLOCK
from memvault.client.upload import ChunkUpload
from memvault.client.workers import DerivativeWorkers
from memvault.commands.messages import sentence
from tests.asgi import CHUNK, InApp, faults, in_app
from tests.faults import Fault, chunk_faults, unavailable

KiB = 1024


@pytest.fixture
async def app() -> AsyncIterator[InApp]:
    async with in_app() as a:
        yield a


@pytest.fixture
async def mv(app: InApp) -> AsyncIterator[AsyncClient]:
    async with app.client() as client:
        yield client


def write(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- upload_file -------------------------------------------------------------------------------


async def test_upload_file_sends_every_chunk_once_and_returns_memory_and_asset(
        app: InApp, mv: AsyncClient) -> None:
    cap = await mv.capsule("family", create=True)
    data = write(app.root / "clip.bin", 10 * CHUNK + 123)
    events: list[Progress] = []
    done = await mv.upload_file(app.root / "clip.bin", cap, parallel=3,
                                on_progress=events.append)
    assert done.asset.sha256 == sha(data)
    assert done.asset.size == len(data)
    assert done.asset.filename == "clip.bin"
    assert done.memory.assets["original"] == done.asset
    assert (done.chunks_sent, done.chunks_skipped, done.bytes_sent) == (11, 0, len(data))
    assert faults(mv).log.count("PUT", "/chunks/") == 11
    assert [e.phase for e in events][:1] == ["begin"]
    assert [e.phase for e in events][-2:] == ["finish", "done"]
    sent = [e.bytes_done for e in events]
    assert sent == sorted(sent)
    assert sent[-1] == len(data)
    assert await mv.list_sessions() == []
    assert list((app.root / "client-state" / "uploads").glob("*.json")) == []


async def test_chunks_carry_a_crc32c_content_digest_the_server_checks(app: InApp) -> None:
    seen: list[str] = []

    class Spy(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if request.method == "PUT":
                seen.append(request.headers.get("content-digest", ""))
            return await app.transport.handle_async_request(request)

    async with AsyncClient(app.url, app.token, transport=Spy(),
                           state_dir=app.root / "s") as mv:
        cap = await mv.create_capsule("c")
        await mv.upload_file(io.BytesIO(os.urandom(2 * CHUNK)), cap)
    assert len(seen) == 2
    assert all(h.startswith("crc32c=:") and h.endswith(":") for h in seen)


async def test_streams_seekable_unseekable_and_empty(app: InApp, mv: AsyncClient) -> None:
    cap = await mv.create_capsule("streams")
    data = os.urandom(3 * CHUNK + 7)
    done = await mv.upload_file(io.BytesIO(data), cap, filename="a.bin")
    assert done.asset.sha256 == sha(data)

    r, w = os.pipe()
    os.write(w, data[: 64 * KiB])  # a pipe holds 64 KiB: enough for a one-chunk stream
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        assert not pipe.seekable()
        done = await mv.upload_file(pipe, cap, size=64 * KiB, filename="pipe.bin")
    assert done.asset.sha256 == sha(data[: 64 * KiB])

    r2, w2 = os.pipe()
    os.close(w2)
    with os.fdopen(r2, "rb") as pipe, pytest.raises(ValueError, match="needs size"):
        await mv.upload_file(pipe, cap)

    (app.root / "empty").write_bytes(b"")
    done = await mv.upload_file(app.root / "empty", cap)
    assert (done.asset.size, done.asset.sha256) == (0, sha(b""))
    assert done.chunks_sent == 0


async def test_content_type_is_sniffed_then_guessed_from_the_name(
        app: InApp, mv: AsyncClient) -> None:
    cap = await mv.create_capsule("types")
    (app.root / "photo.bin").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(100))
    (app.root / "notes.txt").write_bytes(b"hello")
    assert (await mv.upload_file(app.root / "photo.bin", cap)).asset.content_type == "image/jpeg"
    assert (await mv.upload_file(app.root / "notes.txt", cap)).asset.content_type == "text/plain"


async def test_upload_into_an_existing_memory_in_another_role(app: InApp, mv: AsyncClient) -> None:
    cap = await mv.create_capsule("roles")
    memory = await mv.create_memory(cap, title="beach")
    data = os.urandom(5000)
    done = await mv.upload_file(io.BytesIO(data), cap, memory=memory, role="thumb",
                                filename="t.webp", content_type="image/webp")
    assert done.memory.id == memory.id
    assert done.memory.title == "beach"
    assert done.asset.role == "thumb"
    assert done.asset.content_type == "image/webp"
    with pytest.raises(Conflict) as info:
        await mv.upload_file(io.BytesIO(data), cap, memory=memory, role="thumb")
    assert info.value.extra["role"] == "thumb"


# -- resume ------------------------------------------------------------------------------------


async def _cancel_after(mv: AsyncClient, path: Path, cap: str, chunks: int,
                        **kw: Any) -> None:
    """Start an upload and cancel it once ``chunks`` chunks were acknowledged."""
    reached = asyncio.Event()

    def progress(p: Progress) -> None:
        if p.phase == "transfer" and p.chunks_done >= chunks:
            reached.set()

    task = asyncio.create_task(mv.upload_file(path, cap, on_progress=progress, **kw))
    waiter = asyncio.create_task(reached.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    assert not task.done(), "the upload finished before it could be interrupted"
    task.cancel()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancelled_upload_resumes_sending_only_the_missing_chunks(
        app: InApp, mv: AsyncClient) -> None:
    cap = (await mv.create_capsule("resume")).id
    data = write(app.root / "big.bin", 20 * CHUNK + 5)
    await _cancel_after(mv, app.root / "big.bin", cap, 7, parallel=3)
    [pending] = await mv.list_sessions()
    held = set(pending.received)
    assert 7 <= len(held) < 21
    before = faults(mv).log.count("PUT", "/chunks/")

    done = await mv.upload_file(app.root / "big.bin", cap, parallel=3)
    sent = faults(mv).log.count("PUT", "/chunks/") - before
    assert done.session_id == pending.id
    assert sent == done.chunks_sent == 21 - len(held)
    assert done.chunks_skipped == len(held)
    assert done.asset.sha256 == sha(data)
    assert await mv.list_sessions() == []


async def test_a_lost_resume_record_still_finds_the_session_by_idempotency_key(
        app: InApp, mv: AsyncClient) -> None:
    cap = (await mv.create_capsule("lost-record")).id
    data = write(app.root / "f.bin", 12 * CHUNK)
    await _cancel_after(mv, app.root / "f.bin", cap, 4, parallel=2)
    [pending] = await mv.list_sessions()
    for record in (app.root / "client-state" / "uploads").glob("*.json"):
        record.unlink()
    done = await mv.upload_file(app.root / "f.bin", cap, parallel=2)
    assert done.session_id == pending.id
    assert done.chunks_skipped == len(pending.received)
    assert done.asset.sha256 == sha(data)


async def test_another_name_for_an_interrupted_upload_is_another_upload(
        app: InApp, mv: AsyncClient) -> None:
    """Resuming under the first call's name would store the file under a name the caller no
    longer gave; the interrupted one stays resumable under its own name."""
    cap = (await mv.create_capsule("renamed")).id
    data = write(app.root / "f.bin", 12 * CHUNK)
    await _cancel_after(mv, app.root / "f.bin", cap, 4, parallel=2, filename="first.bin",
                        content_type="video/mp4")
    [first] = await mv.list_sessions()
    second = await mv.upload_file(app.root / "f.bin", cap, filename="second.bin",
                                  content_type="image/png")
    assert (second.asset.filename, second.asset.content_type) == ("second.bin", "image/png")
    assert second.session_id != first.id
    assert second.chunks_skipped == 0
    resumed = await mv.upload_file(app.root / "f.bin", cap, filename="first.bin",
                                   content_type="video/mp4")
    assert resumed.session_id == first.id
    assert resumed.chunks_skipped == len(first.received)
    assert (resumed.asset.filename, resumed.asset.sha256) == ("first.bin", sha(data))


async def test_one_file_under_two_names_at_once_makes_two_memories(
        app: InApp, mv: AsyncClient) -> None:
    cap = (await mv.create_capsule("two-names")).id
    write(app.root / "f.bin", 3 * CHUNK)
    done = await asyncio.gather(*(mv.upload_file(app.root / "f.bin", cap, filename=f"n{i}")
                                  for i in range(3)))
    assert sorted(d.asset.filename for d in done) == ["n0", "n1", "n2"]
    assert len({d.memory.id for d in done}) == 3


async def test_two_streams_with_equal_ends_upload_at_once_without_sharing_a_session(
        app: InApp, mv: AsyncClient) -> None:
    """Same size, same first and last blocks, other middles: a stream's fingerprint also
    names the object, so neither takes over the other's session."""
    cap = (await mv.create_capsule("streams")).id
    end = os.urandom(FINGERPRINT_BLOCK)
    one, two = (end + os.urandom(2 * CHUNK) + end for _ in range(2))
    done = await asyncio.gather(mv.upload_file(io.BytesIO(one), cap, parallel=1),
                                mv.upload_file(io.BytesIO(two), cap, parallel=1))
    assert [d.asset.sha256 for d in done] == [sha(one), sha(two)]


async def test_a_failing_done_callback_fails_the_call_but_the_next_returns_the_same_memory(
        app: InApp, mv: AsyncClient) -> None:
    cap = (await mv.create_capsule("callback")).id
    data = write(app.root / "f.bin", 2 * CHUNK)

    def boom(p: Progress) -> None:
        if p.phase == "done":
            raise RuntimeError("the progress display broke")

    with pytest.raises(RuntimeError, match="display broke"):
        await mv.upload_file(app.root / "f.bin", cap, on_progress=boom)
    again = await mv.upload_file(app.root / "f.bin", cap)
    assert again.chunks_sent == 0
    assert again.asset.sha256 == sha(data)
    assert len((await mv.list_memories(cap)).items) == 1


async def test_an_unwritable_state_folder_is_a_warning_not_a_failed_upload(
        app: InApp, caplog: pytest.LogCaptureFixture) -> None:
    blocker = app.root / "not-a-folder"
    blocker.write_bytes(b"")
    async with app.client(state_dir=blocker / "state") as mv:
        cap = (await mv.create_capsule("no-state")).id
        data = write(app.root / "f.bin", 2 * CHUNK)
        with caplog.at_level(logging.WARNING, logger="memvault.client"):
            done = await mv.upload_file(app.root / "f.bin", cap)
        assert done.asset.sha256 == sha(data)
        assert await mv.list_sessions() == []
    warned = [r.getMessage() for r in caplog.records if "resume records" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert "NotADirectoryError" in warned[0]


async def test_a_changed_file_aborts_its_old_session_and_starts_over(
        app: InApp, mv: AsyncClient) -> None:
    cap = (await mv.create_capsule("changed")).id
    path = app.root / "f.bin"
    write(path, 8 * CHUNK)
    await _cancel_after(mv, path, cap, 2, parallel=1)
    [old] = await mv.list_sessions()
    data = write(path, 8 * CHUNK + 1)
    done = await mv.upload_file(path, cap)
    assert done.session_id != old.id
    assert done.chunks_skipped == 0
    assert done.asset.sha256 == sha(data)
    assert await mv.list_sessions() == []  # the old one was aborted, not left to expire


async def test_a_session_that_expired_is_begun_again(app: InApp, mv: AsyncClient) -> None:
    cap = (await mv.create_capsule("expired")).id
    path = app.root / "f.bin"
    data = write(path, 6 * CHUNK)
    await _cancel_after(mv, path, cap, 2, parallel=1)
    [old] = await mv.list_sessions()
    await mv.abort_session(old.id)  # gone on the server: the record now points at nothing
    done = await mv.upload_file(path, cap)
    assert done.session_id != old.id
    assert done.chunks_sent == 6
    assert done.asset.sha256 == sha(data)


async def test_an_upload_whose_finish_answer_was_lost_returns_the_committed_result(
        app: InApp) -> None:
    def lose_finish_answer(method: str, path: str, seen: int) -> Fault | None:
        return Fault(drop_after=True) if path.endswith("/finish") and seen == 0 else None

    async with app.client(rule=lose_finish_answer) as mv:
        cap = await mv.create_capsule("lost-answer")
        data = write(app.root / "f.bin", 3 * CHUNK)
        done = await mv.upload_file(app.root / "f.bin", cap)
        assert done.asset.sha256 == sha(data)
        assert faults(mv).log.count("POST", "/finish") == 2
        page = await mv.list_memories(cap)
        assert [m.id for m in page.items] == [done.memory.id]  # one memory, not two


@contextlib.asynccontextmanager
async def _driven(mv: AsyncClient, path: Path, cap: str) -> AsyncIterator[ChunkUpload]:
    """One file's ``ChunkUpload``, driven step by step by the test."""
    from memvault.client.source import Source

    source = Source(path)
    try:
        yield ChunkUpload(mv.api, source, capsule_id=cap, state=mv.state)
    finally:
        source.close()


async def test_a_session_another_run_finished_meanwhile_is_that_commit_not_a_failure(
        app: InApp, mv: AsyncClient) -> None:
    """Two runs of the same upload share one session (the same idempotency key). When one
    finishes it while the other is sending, the other stops sending and gets the commit
    back, instead of a ``conflict`` for a file that is stored (a CLI review found it)."""
    cap = (await mv.create_capsule("two-runs")).id
    data = write(app.root / "f.bin", 4 * CHUNK)
    async with _driven(mv, app.root / "f.bin", cap) as late:
        session = await late.open()
        first = await mv.upload_file(app.root / "f.bin", cap)  # the other run, to the end
        assert first.session_id == session.id
        await late.transfer()
        done = await late.finish()
    assert late.committed_meanwhile
    assert late.chunks_sent == 0
    assert (done.memory.id, done.asset.sha256) == (first.memory.id, sha(data))
    assert await mv.list_sessions() == []


async def test_finish_resends_chunks_the_server_lost(app: InApp, mv: AsyncClient) -> None:
    """A power cut may lose a chunk's "received" mark (README: the client re-sends it)."""
    cap = (await mv.create_capsule("lost-mark")).id
    data = write(app.root / "f.bin", 6 * CHUNK)
    async with _driven(mv, app.root / "f.bin", cap) as upload:
        session = await upload.open()
        await upload.transfer()
        db = app.settings.data_dir / "memvault.db"
        with sqlite3.connect(db) as conn:
            conn.execute("DELETE FROM upload_parts WHERE session_id = ? AND offset = ?",
                         (session.id, 4 * CHUNK))
        done = await upload.finish()
    assert done.asset.sha256 == sha(data)
    assert done.chunks_sent == 7  # six, and chunk 4 again


# -- file changes ------------------------------------------------------------------------------


async def test_a_file_that_changes_during_the_upload_fails_and_its_session_is_aborted(
        app: InApp, mv: AsyncClient) -> None:
    cap = (await mv.create_capsule("growing")).id
    path = app.root / "log.txt"
    write(path, 6 * CHUNK)

    def append(p: Progress) -> None:
        if p.phase == "transfer" and p.chunks_done == 1:
            with path.open("ab") as f:
                f.write(b"more")

    with pytest.raises(FileChanged, match="changed while it was being uploaded") as info:
        await mv.upload_file(path, cap, parallel=1, on_progress=append)
    assert any("was aborted" in note for note in info.value.__notes__)
    assert await mv.list_sessions() == []


async def test_a_declared_sha256_that_does_not_match_stops_before_finish(
        app: InApp, mv: AsyncClient) -> None:
    cap = (await mv.create_capsule("declared")).id
    write(app.root / "f.bin", 2 * CHUNK)
    with pytest.raises(ChecksumMismatch, match="not to the sha256 given") as info:
        await mv.upload_file(app.root / "f.bin", cap, sha256="ab" * 32)
    assert info.value.extra["expected"] == "ab" * 32
    assert await mv.list_sessions() == []
    assert faults(mv).log.count("POST", "/finish") == 0


async def test_a_change_the_fingerprint_misses_is_caught_by_the_digest_at_finish(
        app: InApp, mv: AsyncClient) -> None:
    """Same size, end blocks and mtime, a different middle: resume skips the chunk the
    server holds, but the SHA-256 read from the local file no longer matches."""
    cap = (await mv.create_capsule("sneaky")).id
    path = app.root / "f.bin"
    data = bytearray(write(path, 40 * CHUNK))  # 2.5 MiB: more than the two 1 MiB end blocks
    stat = path.stat()
    await _cancel_after(mv, path, cap, 20, parallel=1)
    [pending] = await mv.list_sessions()
    assert 18 in pending.received
    data[18 * CHUNK + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ChecksumMismatch) as info:
        await mv.upload_file(path, cap)
    assert info.value.extra["computed"] != info.value.extra["expected"]
    assert any("was aborted" in n for n in info.value.__notes__)
    assert await mv.list_sessions() == []
    done = await mv.upload_file(path, cap)  # and the next try starts over and succeeds
    assert done.asset.sha256 == sha(bytes(data))


# -- errors and retries ------------------------------------------------------------------------


async def test_errors_are_typed_with_status_code_detail_and_extra(
        app: InApp, mv: AsyncClient) -> None:
    with pytest.raises(NotFound) as nf:
        await mv.upload_file(io.BytesIO(b"x"), "cap_missing")
    assert (nf.value.status, nf.value.code) == (404, "not_found")
    assert "cap_missing" in nf.value.detail
    assert faults(mv).log.count("POST", "/v1/uploads") == 1  # at once, not retried

    cap = await mv.create_capsule("errors")
    with pytest.raises(InvalidArgument) as bad:
        await mv.upload_file(io.BytesIO(b"x"), cap, role="poster")
    assert "role" in bad.value.detail
    with pytest.raises(Conflict):
        await mv.create_capsule("errors")

    async with app.client("mvt_not_a_token") as stranger:
        with pytest.raises(Unauthenticated):
            await stranger.list_capsules()

    user_token = await _mint(app, "bob")
    async with app.client(user_token) as bob:
        with pytest.raises(Forbidden):
            await bob.admin_sessions()
        with pytest.raises(NotFound):  # alice's capsule does not exist for bob
            await bob.list_memories(cap)


async def _mint(app: InApp, name: str) -> str:
    from memvault.auth import AuthService
    from memvault.clock import SystemClock
    from memvault.metadata import Database

    db = Database.open(app.settings.resolved_database_url)
    try:
        _, token = await AuthService(db, SystemClock()).create_principal(name)
    finally:
        await db.dispose()
    return token


async def test_incomplete_carries_the_missing_indices(app: InApp, mv: AsyncClient) -> None:
    cap = (await mv.create_capsule("incomplete")).id
    session = (await mv.api.call("POST", "/v1/uploads", json={
        "capsule_id": cap, "filename": "f", "size": 3 * CHUNK, "idempotency_key": "k"})).json()
    with pytest.raises(MemvaultError) as info:
        await mv.api.call("POST", f"/v1/uploads/{session['id']}/finish",
                          json={"size": 3 * CHUNK, "sha256": "0" * 64})
    assert info.value.code == "incomplete"
    assert info.value.extra["missing"] == [0, 1, 2]


async def test_transient_answers_are_retried_and_the_upload_finishes(app: InApp) -> None:
    rule = chunk_faults(unavailable(0), every=2, times=2)
    async with app.client(rule=rule) as mv:
        cap = await mv.create_capsule("flaky")
        data = write(app.root / "f.bin", 9 * CHUNK)
        done = await mv.upload_file(app.root / "f.bin", cap, parallel=4)
        assert done.asset.sha256 == sha(data)
        log = faults(mv).log
        assert len(log.injected) == 10  # chunks 0, 2, 4, 6, 8: twice each
        assert log.count("PUT", "/chunks/") == 9


@pytest.mark.parametrize("fault", [
    Fault(502, body=b"<html>Bad Gateway</html>"),
    Fault(500),
    Fault(408),
    Fault(429, {"Retry-After": "0"}),
    Fault(drop_before=True),
    Fault(drop_after=True),
], ids=["proxy-502-html", "500", "408", "429", "refused", "answer-lost"])
async def test_each_transient_fault_is_retried(app: InApp, fault: Fault) -> None:
    async with app.client(rule=chunk_faults(fault, every=1, times=1)) as mv:
        cap = await mv.create_capsule("faults")
        data = write(app.root / "f.bin", 3 * CHUNK)
        done = await mv.upload_file(app.root / "f.bin", cap)
        assert done.asset.sha256 == sha(data)
        assert len(faults(mv).log.injected) == 3


async def test_a_redirect_is_an_error_never_a_success(app: InApp) -> None:
    """memvault never redirects; a 307 from something in between is not the abort it
    answered (the CLI said "aborted" for ``DELETE /v1/uploads/``'s redirect)."""
    def rule(method: str, path: str, seen: int) -> Fault | None:
        if method == "DELETE" or (method == "GET" and "/assets/" in path):
            return Fault(307, {"Location": "http://elsewhere.invalid/"}, body=b"")
        return None

    async with app.client(rule=rule) as mv:
        cap = await mv.create_capsule("redirects")
        write(app.root / "p.bin", 3 * CHUNK)
        await _cancel_after(mv, app.root / "p.bin", cap.id, 1, parallel=1)
        [session] = await mv.list_sessions()
        with pytest.raises(BadResponse) as info:
            await mv.abort_session(session.id)
        assert info.value.http_status == 307
        assert (await mv.get_session(session.id)).state == "pending"
        done = await mv.upload_file(io.BytesIO(b"abc"), cap, filename="r.bin")
        with pytest.raises(BadResponse):
            await mv.download(done.memory, dest=app.root / "r.bin")
        assert not (app.root / "r.bin").exists()
        with pytest.raises(InvalidArgument):
            await mv.abort_session("")
        with pytest.raises(InvalidArgument):
            await mv.get_memory("")


async def test_retries_are_bounded_and_say_how_long_they_tried(app: InApp) -> None:
    policy = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.002)
    always = chunk_faults(Fault(502, body=b"bad gateway"), every=1, times=99)
    async with app.client(rule=always, retry=policy) as mv:
        cap = await mv.create_capsule("bounded")
        write(app.root / "f.bin", CHUNK)
        with pytest.raises(BadResponse) as info:
            await mv.upload_file(app.root / "f.bin", cap)
        assert info.value.http_status == 502
        assert "gave up after 3 attempts" in "".join(info.value.__notes__)
        assert len(faults(mv).log.injected) == 3
        [pending] = await mv.list_sessions()  # kept for the next call to resume
        assert pending.received == []


async def test_a_retry_after_longer_than_the_budget_is_raised_at_once(app: InApp) -> None:
    """A tiny pending-session cap: the next begin must wait for an expiry (hours away)."""
    async with in_app(max_pending_per_capsule=1) as capped, capped.client() as mv:
        cap = (await mv.create_capsule("capped")).id
        path = capped.root / "a.bin"
        write(path, 4 * CHUNK)
        await _cancel_after(mv, path, cap, 1, parallel=1)
        begins = faults(mv).log.count("POST", "/v1/uploads")
        with pytest.raises(ResourceExhausted) as info:
            await mv.upload_file(io.BytesIO(b"second"), cap)
        error = info.value
        assert error.extra["limit_name"] == "pending_sessions_per_capsule"
        assert error.retry_after is not None
        assert error.retry_after > 3600
        assert faults(mv).log.count("POST", "/v1/uploads") == begins + 1  # no retry
        assert "the server asked to wait" in "".join(error.__notes__)
        # The interrupted one still resumes: a begin for its own key holds its place.
        done = await mv.upload_file(path, cap)
        assert done.chunks_skipped >= 1


async def test_a_post_that_may_have_reached_the_server_is_not_repeated(app: InApp) -> None:
    def lose(method: str, path: str, seen: int) -> Fault | None:
        return Fault(drop_after=True) if (method, path) == ("POST", "/v1/capsules") else None

    async with app.client(rule=lose) as mv:
        with pytest.raises(ConnectionFailed):
            await mv.create_capsule("once")
        assert faults(mv).log.count("POST", "/v1/capsules") == 1
        # get-or-create copes: the capsule exists after all.
        assert (await mv.capsule("once", create=True)).name == "once"


async def test_the_pending_cap_says_what_frees_a_place_not_a_day_to_wait() -> None:
    async with in_app(max_pending_per_capsule=1) as app, app.client() as mv:
        cap = (await mv.create_capsule("cap-full")).id
        write(app.root / "a.bin", 6 * CHUNK)
        await _cancel_after(mv, app.root / "a.bin", cap, 2, parallel=1)
        with pytest.raises(ResourceExhausted) as info:
            await mv.upload_file(io.BytesIO(b"x"), cap, filename="b.bin")
        assert info.value.retry_after is not None
        assert info.value.retry_after > 3600
        message = sentence(info.value)
        assert message.startswith("resource_exhausted: 1 uploads are already pending")
        assert "`memvault sessions` lists them" in message
        assert "try again in" not in message


async def test_unavailable_exhausted_keeps_the_typed_error(app: InApp) -> None:
    policy = RetryPolicy(attempts=2, base_delay=0.001)
    async with app.client(rule=chunk_faults(unavailable(0), every=1, times=9),
                          retry=policy) as mv:
        cap = await mv.create_capsule("unavailable")
        with pytest.raises(Unavailable):
            await mv.upload_file(io.BytesIO(b"x" * 10), cap)


# -- upload_memory -----------------------------------------------------------------------------


async def test_upload_memory_with_given_derivatives_makes_a_four_asset_memory(
        app: InApp, mv: AsyncClient) -> None:
    cap = await mv.create_capsule("lanes")
    original = write(app.root / "IMG_1.jpg", 9 * CHUNK)
    given = {"display": os.urandom(3 * CHUNK), "thumb": os.urandom(20 * KiB),
             "placeholder": os.urandom(600)}
    events: list[Progress] = []
    memory = await mv.upload_memory(app.root / "IMG_1.jpg", capsule=cap, derivatives=given,
                                    on_progress=events.append)
    assert sorted(memory.assets) == ["display", "original", "placeholder", "thumb"]
    assert memory.assets["original"].sha256 == sha(original)
    for role, data in given.items():
        assert memory.assets[role].sha256 == sha(data)
        assert memory.assets[role].filename == f"IMG_1.{role}.bin"
    assert {e.role for e in events} == {"original", "display", "thumb", "placeholder"}
    assert await mv.list_sessions() == []
    # All four are committed together, by one finish, so the memory never holds derivatives
    # without its original, and the answer carries the memory (no read after it).
    passed = faults(mv).log.passed
    finishes = [i for i, (m, p) in enumerate(passed) if m == "POST" and p.endswith("/finish")]
    assert [passed[i][1] for i in finishes] == ["/v1/uploads/finish"]
    assert passed[finishes[0] + 1:] == [("GET", "/v1/uploads")]  # the list_sessions above
    assert await mv.get_memory(memory.id) == memory


async def test_upload_memory_finishes_alone_when_the_joint_finish_fails(app: InApp) -> None:
    """A joint finish that fails (here a 507 on it) leaves each upload to finish on its own:
    the original first, then its derivatives."""
    def refuse_joint(method: str, path: str, seen: int) -> Fault | None:
        return Fault(507) if (method, path) == ("POST", "/v1/uploads/finish") else None

    async with app.client(rule=refuse_joint) as mv:
        cap = await mv.create_capsule("lanes-alone")
        original = write(app.root / "IMG_2.jpg", 5 * CHUNK)
        given = {"display": os.urandom(2 * CHUNK), "thumb": os.urandom(9 * KiB),
                 "placeholder": os.urandom(300)}
        memory = await mv.upload_memory(app.root / "IMG_2.jpg", capsule=cap,
                                        derivatives=given)
        assert memory.assets["original"].sha256 == sha(original)
        for role, data in given.items():
            assert memory.assets[role].sha256 == sha(data)
        finishes = [p for m, p in faults(mv).log.passed
                    if m == "POST" and p.endswith("/finish")]
        assert len(finishes) == 4
        assert "/v1/uploads/finish" not in finishes  # refused before it reached the server
        committed = {role: datetime.fromisoformat(a.created_at or "")
                     for role, a in memory.assets.items()}
        assert committed["original"] <= min(committed[r] for r in given)
        assert await mv.list_sessions() == []


async def test_upload_memory_auto_skips_what_is_not_an_image(app: InApp, mv: AsyncClient) -> None:
    cap = await mv.create_capsule("pdf")
    (app.root / "doc.pdf").write_bytes(b"%PDF-1.7\n" + os.urandom(2 * CHUNK))
    memory = await mv.upload_memory(app.root / "doc.pdf", capsule=cap)
    assert sorted(memory.assets) == ["original"]
    assert memory.assets["original"].content_type == "application/pdf"


async def test_lane_b_failure_names_its_cause_and_the_original_is_kept(
        app: InApp, mv: AsyncClient) -> None:
    cap = await mv.create_capsule("lane-b")
    write(app.root / "a.jpg", 3 * CHUNK)
    with pytest.raises(UploadMemoryError) as info:
        await mv.upload_memory(app.root / "a.jpg", capsule=cap,
                               derivatives={"display": app.root / "missing.jpg"})
    group = info.value
    assert "lane B (derivatives): FileNotFoundError" in str(group)
    [error] = group.exceptions
    assert isinstance(error, FileNotFoundError)
    assert any("lane B" in n for n in error.__notes__)
    assert group.memory_id is not None
    memory = await mv.get_memory(group.memory_id)
    assert sorted(memory.assets) == ["original"]
    assert await mv.list_sessions() == []


async def test_lane_a_failure_stops_lane_b_and_leaves_no_session(
        app: InApp, mv: AsyncClient) -> None:
    write(app.root / "a.jpg", 3 * CHUNK)
    with pytest.raises(UploadMemoryError) as info:
        await mv.upload_memory(app.root / "a.jpg", capsule="cap_nowhere",
                               derivatives={"thumb": b"t"})
    [error] = info.value.exceptions
    assert isinstance(error, NotFound)
    assert "lane A (original): not_found: capsule cap_nowhere not found" in str(info.value)
    assert info.value.memory_id is None
    assert await mv.list_sessions() == []


async def test_lane_a_failing_after_begin_stops_lane_b_and_leaves_no_session(
        app: InApp, mv: AsyncClient) -> None:
    cap = await mv.create_capsule("lane-a-late")
    path = app.root / "a.jpg"
    write(path, 6 * CHUNK)

    def grow(p: Progress) -> None:
        if p.role == "original" and p.phase == "transfer" and p.chunks_done == 2:
            with path.open("ab") as f:
                f.write(b"!")

    with pytest.raises(UploadMemoryError) as info:
        await mv.upload_memory(path, capsule=cap, parallel=1, on_progress=grow,
                               derivatives={"display": os.urandom(2 * CHUNK)})
    [error] = info.value.exceptions
    assert isinstance(error, FileChanged)
    assert await mv.list_sessions() == []  # lane B's sessions were aborted too
    # Lane B never commits before the original: the memory lane A made is gone with it.
    assert (await mv.list_memories(cap)).items == []


async def test_an_interrupted_memory_upload_resumes_both_lanes(
        app: InApp, mv: AsyncClient) -> None:
    cap = (await mv.create_capsule("resume-lanes")).id
    path = app.root / "a.jpg"
    original = write(path, 12 * CHUNK)
    given = {"display": os.urandom(2 * CHUNK), "thumb": os.urandom(CHUNK // 2)}
    reached = asyncio.Event()

    def progress(p: Progress) -> None:
        if p.role == "original" and p.chunks_done >= 5:
            reached.set()

    task = asyncio.create_task(mv.upload_memory(path, capsule=cap, derivatives=given,
                                                parallel=2, on_progress=progress))
    await reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pending = await mv.list_sessions()
    assert "original" in {s.role for s in pending}
    memory = await mv.upload_memory(path, capsule=cap, derivatives=given, parallel=2)
    assert memory.id == next(s.memory_id for s in pending)
    assert memory.assets["original"].sha256 == sha(original)
    assert {r: memory.assets[r].sha256 for r in given} == {r: sha(d) for r, d in given.items()}
    assert await mv.list_sessions() == []


async def test_a_cancelled_memory_upload_has_aborted_lane_b_when_it_returns(
        app: InApp, mv: AsyncClient) -> None:
    # Cancelling run() cancels lane B, and lane A's end would cancel it again: that second
    # cancel used to break lane B out of its shielded aborts, so the call returned with the
    # derivatives' sessions still pending (and a client closed right after never sent them).
    cap = (await mv.create_capsule("cancel-lanes")).id
    path = app.root / "a.jpg"
    write(path, 40 * CHUNK)
    given = {"display": os.urandom(2 * CHUNK), "thumb": os.urandom(CHUNK // 2)}
    sent: set[str] = set()
    lane_b_sent = asyncio.Event()

    def progress(p: Progress) -> None:
        if p.role in given and p.phase == "transfer" and p.bytes_done == p.total:
            sent.add(p.role)
            if sent == set(given):
                lane_b_sent.set()

    task = asyncio.create_task(mv.upload_memory(path, capsule=cap, derivatives=given,
                                                parallel=1, on_progress=progress))
    await lane_b_sent.wait()
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert {s.role for s in await mv.list_sessions()} == {"original"}


async def test_empty_derivatives_are_refused_before_anything_is_sent(
        app: InApp, mv: AsyncClient) -> None:
    cap = await mv.create_capsule("empty-derivative")
    write(app.root / "a.jpg", 2 * CHUNK)
    with pytest.raises(ValueError, match="the thumb derivative is empty"):
        await mv.upload_memory(app.root / "a.jpg", capsule=cap, derivatives={"thumb": b""})
    (app.root / "empty.jpg").write_bytes(b"")
    with pytest.raises(UploadMemoryError) as info:  # a path is read in lane B
        await mv.upload_memory(app.root / "a.jpg", capsule=cap,
                               derivatives={"display": app.root / "empty.jpg"})
    [error] = info.value.exceptions
    assert "the display derivative is empty" in str(error)
    memory = await mv.get_memory(info.value.memory_id or "")
    assert sorted(memory.assets) == ["original"]  # the server makes the display itself
    assert await mv.list_sessions() == []


async def test_two_files_of_one_name_in_two_folders_never_share_a_session(
        app: InApp, mv: AsyncClient) -> None:
    # Same name, size, modification time and end blocks (the fingerprint), other middle.
    cap = (await mv.create_capsule("same-name")).id
    head, tail = os.urandom(FINGERPRINT_BLOCK), os.urandom(FINGERPRINT_BLOCK)
    paths = []
    for folder in ("a", "b"):
        (app.root / folder).mkdir()
        path = app.root / folder / "x.bin"
        path.write_bytes(head + os.urandom(20 * CHUNK) + tail)
        os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
        paths.append(path)
    await _cancel_after(mv, paths[0], cap, 4, parallel=1)
    [first] = await mv.list_sessions()
    done = await mv.upload_file(paths[1], cap)
    assert done.session_id != first.id
    assert done.chunks_skipped == 0
    assert done.asset.sha256 == sha(paths[1].read_bytes())
    # The first file's interrupted upload is untouched, and resumes.
    assert [s.id for s in await mv.list_sessions()] == [first.id]
    resumed = await mv.upload_file(paths[0], cap)
    assert resumed.session_id == first.id
    assert resumed.asset.sha256 == sha(paths[0].read_bytes())


async def test_discard_upload_aborts_what_an_interrupted_call_left(
        app: InApp, mv: AsyncClient) -> None:
    cap = (await mv.create_capsule("discard")).id
    path = app.root / "f.bin"
    write(path, 10 * CHUNK)
    await _cancel_after(mv, path, cap, 3, parallel=1)
    assert len(await mv.list_sessions()) == 1
    assert await mv.discard_upload(path, cap) is True
    assert await mv.list_sessions() == []
    assert await mv.discard_upload(path, cap) is False  # nothing recorded any more
    done = await mv.upload_file(path, cap)
    assert done.chunks_skipped == 0


async def test_the_derivative_worker_outlives_a_ctrl_c_the_app_handles(tmp_path: Path) -> None:
    # Ctrl-C goes to the whole process group. An app that catches it and carries on (the
    # CLI under a shell that ignores it, a GUI) must not lose its worker mid-upload.
    path = tmp_path / "a.jpg"
    Image.effect_noise((64, 48), 50).convert("RGB").save(path, "JPEG")
    workers = DerivativeWorkers()
    try:
        await workers.make(str(path))
        [worker] = workers._idle
        os.kill(worker.proc.pid, signal.SIGINT)
        await asyncio.sleep(0.3)
        assert worker.proc.returncode is None
        made = await workers.make(str(path))
        assert made.thumb.data
        assert workers._idle == [worker]
    finally:
        await workers.close()


async def test_the_thumbhash_given_or_made_is_stored(app: InApp, mv: AsyncClient) -> None:
    cap = await mv.create_capsule("thumbhash")
    memory = await mv.upload_memory(io.BytesIO(os.urandom(100)), capsule=cap,
                                    derivatives={"placeholder": b"p" * 50},
                                    thumbhash="3OcRJYB4d3h/iIeHeEh3eIhw+j2w", filename="x.jpg")
    assert memory.thumbhash == "3OcRJYB4d3h/iIeHeEh3eIhw+j2w"


async def test_update_memory_changes_only_what_is_given(mv: AsyncClient) -> None:
    cap = await mv.create_capsule("update")
    memory = await mv.create_memory(cap, title="beach", metadata={"people": ["ana"]})
    changed = await mv.update_memory(memory, taken_at="2024-07-01T10:00:00Z")
    assert (changed.title, changed.taken_at) == ("beach", "2024-07-01T10:00:00Z")
    assert changed.metadata == {"people": ["ana"]}
    cleared = await mv.update_memory(memory.id, title=None, metadata={})
    assert (cleared.title, cleared.metadata) == (None, {})
    with pytest.raises(InvalidArgument):
        await mv.update_memory(memory, thumbhash="not base64!")


# -- reads -------------------------------------------------------------------------------------


async def test_capsules_get_or_create_and_a_helpful_not_found(mv: AsyncClient) -> None:
    with pytest.raises(NotFound, match="capsule 'family' not found"):
        await mv.capsule("family")
    made = await mv.capsule("family", create=True)
    assert await mv.capsule("family") == made
    assert await mv.capsule("family", create=True) == made
    assert [c.name for c in await mv.list_capsules()] == ["family"]


async def test_iterating_memories_follows_the_cursor(mv: AsyncClient) -> None:
    cap = await mv.create_capsule("pages")
    made = [await mv.create_memory(cap, title=str(i)) for i in range(7)]
    seen = [m.id async for m in mv.iter_memories(cap, page_size=3)]
    assert seen == [m.id for m in reversed(made)]


async def test_find_memories_by_sha256_is_right_even_if_the_server_ignores_the_filter(
        app: InApp, mv: AsyncClient) -> None:
    cap = await mv.create_capsule("find")
    blobs = [os.urandom(1000 + i) for i in range(5)]
    done = [await mv.upload_file(io.BytesIO(b), cap, filename=f"{i}.bin")
            for i, b in enumerate(blobs)]
    found = await mv.find_memories(cap, sha(blobs[2]).upper())
    assert [m.id for m in found] == [done[2].memory.id]
    assert await mv.find_memories(cap, sha(b"nothing")) == []


async def test_download_to_a_file_a_folder_and_a_stream(app: InApp, mv: AsyncClient) -> None:
    cap = await mv.create_capsule("downloads")
    data = write(app.root / "IMG 7.jpg", 5 * CHUNK + 3)
    memory = (await mv.upload_file(app.root / "IMG 7.jpg", cap)).memory
    out = await mv.download(memory, "original", app.root / "copy.jpg")
    assert out == app.root / "copy.jpg"
    assert out.read_bytes() == data
    folder = app.root / "dl"
    folder.mkdir()
    assert (await mv.download(memory.id, dest=folder)) == folder / "IMG 7.jpg"
    sink = io.BytesIO()
    assert await mv.download(memory.id, dest=sink) is None
    assert sink.getvalue() == data
    with pytest.raises(NotFound, match="has no 'display' asset"):
        await mv.download(memory, "display", app.root / "nope")


async def test_download_resumes_from_a_part_file_with_a_range(app: InApp) -> None:
    ranges: list[str] = []

    class Recording(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            ranges.append(request.headers.get("range", ""))
            return await app.transport.handle_async_request(request)

    async with AsyncClient(app.url, app.token, transport=Recording(),
                           state_dir=app.root / "s") as mv:
        cap = await mv.create_capsule("resume-download")
        data = write(app.root / "f.bin", 4 * CHUNK)
        memory = (await mv.upload_file(app.root / "f.bin", cap)).memory
        asset = memory.assets["original"]
        part = part_path(app.root / "out.bin", asset)
        part.write_bytes(data[:100_000])
        out = await mv.download(memory, dest=app.root / "out.bin")
        assert out is not None
        assert out.read_bytes() == data
        assert not part.exists()
        assert ranges[-1] == "bytes=100000-"

        # A part that is not a prefix of the asset after all (damaged on disk): the digest
        # catches it, and the download starts once more from the first byte.
        part = part_path(app.root / "bad.bin", asset)
        part.write_bytes(b"\0" * 1000)
        ranges.clear()
        out = await mv.download(memory, dest=app.root / "bad.bin")
        assert out is not None
        assert out.read_bytes() == data
        assert not part.exists()
        assert ranges[-2:] == ["bytes=1000-", ""]


async def test_a_part_of_another_asset_under_the_same_name_is_left_alone(app: InApp) -> None:
    """Two cameras' IMG_0001.JPG fetched into one folder: B's download never continues A's
    interrupted part, and A's part is still there for A."""
    async with app.client() as mv:
        cap = await mv.create_capsule("same-name")
        a_data, b_data = os.urandom(3 * CHUNK), os.urandom(3 * CHUNK)
        a = (await mv.upload_file(io.BytesIO(a_data), cap, filename="IMG_0001.JPG")).memory
        b = (await mv.upload_file(io.BytesIO(b_data), cap, filename="IMG_0001.JPG")).memory
        folder = app.root / "dl"
        folder.mkdir()
        a_part = part_path(folder / "IMG_0001.JPG", a.assets["original"])
        a_part.write_bytes(a_data[:50_000])
        out = await mv.download(b, dest=folder)
        assert out == folder / "IMG_0001.JPG"
        assert out.read_bytes() == b_data
        assert a_part.read_bytes() == a_data[:50_000]
        assert await mv.download(a, dest=folder / "a.jpg") == folder / "a.jpg"


async def test_a_long_file_name_still_downloads_into_a_folder(app: InApp) -> None:
    """244 bytes of name: with the digest and ".part" it would pass the 255-byte limit."""
    async with app.client() as mv:
        cap = await mv.create_capsule("long-name")
        data = os.urandom(CHUNK)
        name = "写真" * 40 + ".jpg"
        memory = (await mv.upload_file(io.BytesIO(data), cap, filename=name)).memory
        folder = app.root / "long"
        folder.mkdir()
        assert len(os.fsencode(part_path(folder / name, memory.assets["original"]).name)) <= 255
        out = await mv.download(memory, dest=folder)
        assert out == folder / name
        assert out.read_bytes() == data
        assert sorted(p.name for p in folder.iterdir()) == [name]


@pytest.mark.parametrize("name", ["写真" * 80 + ".jpg", "x" * 400 + ".jpeg", "y" * 300])
async def test_a_file_name_longer_than_a_file_may_be_is_shortened_in_a_folder(
        app: InApp, name: str) -> None:
    """The server keeps names of up to 500 characters; a folder gets the longest prefix that
    fits 255 bytes, with the extension (before: every byte fetched and verified, then the
    rename failed with a raw OSError, for ever)."""
    async with app.client() as mv:
        cap = await mv.create_capsule("longer-name")
        data = os.urandom(CHUNK + 1)
        memory = (await mv.upload_file(io.BytesIO(data), cap, filename=name)).memory
        folder = app.root / "longer"
        folder.mkdir()
        out = await mv.download(memory, dest=folder)
        assert out is not None
        assert out.read_bytes() == data
        assert [p.name for p in folder.iterdir()] == [out.name]
        assert 250 <= len(os.fsencode(out.name)) <= 255
        ext = os.path.splitext(name)[1]
        assert out.name.endswith(ext)
        assert name.startswith(out.name[: len(out.name) - len(ext)])


@pytest.mark.parametrize("given", ["../admin/config", "..", ".", "../../healthz",
                                   "{memory}/assets/original", "{memory}?x=1", "{memory}#f"])
async def test_an_id_that_is_no_id_is_not_found_and_never_another_path(
        app: InApp, given: str) -> None:
    """Ids go into the path as one segment each: a caller's string never reaches another
    route (the admin config, with the caller's token) or a query."""
    async with app.client() as mv:
        cap = await mv.create_capsule("ids")
        memory = await mv.create_memory(cap)
        hostile = given.format(memory=memory.id)
        with pytest.raises(NotFound):
            await mv.get_memory(hostile)
        with pytest.raises(NotFound):
            await mv.list_memories(hostile.replace(memory.id, cap.id))
        with pytest.raises(NotFound):
            await mv.get_session(hostile)
        with pytest.raises(NotFound):
            await mv.abort_session(hostile)


async def test_a_download_whose_stored_bytes_are_damaged_fails_and_says_so(app: InApp) -> None:
    async with app.client() as mv:
        cap = await mv.create_capsule("damaged")
        data = os.urandom(CHUNK)
        memory = (await mv.upload_file(io.BytesIO(data), cap, filename="d.bin")).memory
        asset = memory.assets["original"]
        [blob] = (app.root / "data" / "blobs").rglob(asset.sha256)
        blob.write_bytes(b"x" * len(data))
        with pytest.raises(ChecksumMismatch) as info:
            await mv.download(memory, dest=app.root / "d.bin")
        assert not (app.root / "d.bin").exists()
        assert not part_path(app.root / "d.bin", asset).exists()
        message = sentence(info.value)
        assert "partial download was removed" in message
        assert "uploaded" not in message


def broken_after(response: httpx.Response, body: bytes, n: int) -> httpx.Response:
    """``response`` again, its body breaking off after ``n`` bytes as a reset link would."""
    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield body[:n]
            raise httpx.ReadError("connection reset mid-body (injected)")

    return httpx.Response(response.status_code, headers=response.headers, stream=Broken())


async def test_a_download_cut_mid_body_continues_from_where_it_stopped(app: InApp) -> None:
    cut = {"done": False}

    class Cutting(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            response = await app.transport.handle_async_request(request)
            if request.method == "GET" and "/assets/" in request.url.path and not cut["done"]:
                cut["done"] = True
                return broken_after(response, await response.aread(), 50_000)
            return response

    async with AsyncClient(app.url, app.token, transport=Cutting(),
                           state_dir=app.root / "s") as mv:
        cap = await mv.create_capsule("cut")
        data = os.urandom(3 * CHUNK)
        memory = (await mv.upload_file(io.BytesIO(data), cap, filename="c.bin")).memory
        sink = io.BytesIO()
        await mv.download(memory, dest=sink)
        assert cut["done"]
        assert sink.getvalue() == data
async def test_a_download_over_a_link_that_keeps_breaking_still_gets_there(
        app: InApp) -> None:
    """Every answer breaks after 40,000 bytes of body: each try keeps what it received, and
    the retry count starts again after every try that got somewhere."""
    cuts: list[str] = []

    class Flaky(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            response = await app.transport.handle_async_request(request)
            if request.method != "GET" or "/assets/" not in request.url.path:
                return response
            body = await response.aread()
            if len(body) <= 40_000:
                return httpx.Response(response.status_code, headers=response.headers,
                                      content=body)
            cuts.append(request.headers.get("range", ""))
            return broken_after(response, body, 40_000)

    policy = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.002)
    async with AsyncClient(app.url, app.token, transport=Flaky(), retry=policy,
                           state_dir=app.root / "s") as mv:
        cap = await mv.create_capsule("flaky")
        data = os.urandom(4 * CHUNK)
        memory = (await mv.upload_file(io.BytesIO(data), cap, filename="f.bin")).memory
        out = await mv.download(memory, dest=app.root / "f.bin")
        assert out is not None
        assert out.read_bytes() == data
        assert len(cuts) == len(data) // 40_000
        assert cuts[:3] == ["", "bytes=40000-", "bytes=80000-"]


async def test_retry_after_is_honoured_on_a_foreign_error_page(
        app: InApp, caplog: pytest.LogCaptureFixture) -> None:
    """A proxy's 503 or 429 with an HTML body still says how long to wait."""
    page = Fault(503, {"Retry-After": "1"}, body=b"<html>busy, come back later</html>")

    def once(method: str, path: str, seen: int) -> Fault | None:
        return page if (method, path, seen) == ("GET", "/v1/capsules", 0) else None

    caplog.set_level("INFO", logger="memvault.client")
    async with app.client(rule=once) as mv:
        await mv.list_capsules()
        assert len(faults(mv).log.injected) == 1
    [waited] = [r for r in caplog.records if r.getMessage().startswith("retrying GET")]
    assert float(waited.getMessage().split(" in ")[1].split(" s")[0]) >= 1.0


