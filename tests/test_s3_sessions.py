"""The session core on the S3 store (moto), in-process: what finish reads back, and what a
crash between completing the multipart upload and the metadata transaction leaves.

"Another process" is a second UploadService with its own S3 store over the same database:
it shares nothing with the first but the metadata and the bucket, as a second server would.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from random import Random
from typing import Any

import pytest
import sqlalchemy as sa
from botocore.exceptions import ClientError

from memvault.errors import ChecksumMismatch, Expired, NotFound, PayloadTooLarge
from memvault.jobs.queue import JobQueue
from memvault.jobs.runner import DerivativeRunner
from memvault.metadata.schema import blobs, upload_parts
from memvault.sessions import ChunkChecksums
from memvault.settings import Settings
from memvault.storage.factory import close_blob_store, open_blob_store
from memvault.storage.s3 import S3BlobStore
from memvault.uploads import UploadService
from tests.inprocess import InProcess, inprocess, pieces
from tests.s3server import REGION, S3Server

MiB = 1024 * 1024
PART = 5 * MiB


@pytest.fixture
def s3_server(any_s3: S3Server) -> S3Server:
    """Every test here runs on moto and on rclone."""
    return any_s3


@pytest.fixture
def s3_settings(s3_server: S3Server, tmp_path: Path) -> dict[str, Any]:
    bucket = s3_server.new_bucket()
    return {"blob_store": f"s3://{bucket}/mv", "s3_endpoint_url": s3_server.endpoint_url,
            "s3_region": REGION, "s3_spool_dir": tmp_path / "spool", "chunk_size": PART}


@asynccontextmanager
async def other_process(ip: InProcess) -> AsyncIterator[UploadService]:
    """A second server process: its own blob store (spool, client), the same metadata."""
    store = await open_blob_store(ip.settings)
    uploads = UploadService(ip.db, store, ip.clock, ip.settings, ip.capsules)
    try:
        yield uploads
    finally:
        await uploads.sessions.close()
        await close_blob_store(store)


async def put(ip: InProcess, uploads: UploadService, session_id: str, index: int,
              data: bytes) -> None:
    session = await uploads.sessions.get(session_id, ip.caller.id)
    offset, length = session.chunk_range(index)
    await uploads.put_chunk(ip.caller, session_id, index, length,
                            pieces(data[offset:offset + length], Random(index)),
                            ChunkChecksums())
    await uploads.sessions.join_hashing(session_id)


def ranges_read(store: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record every ranged GET the store makes from here on."""
    seen: list[tuple[int, int]] = []
    original = store._get

    def spy(target: str, start: int, end: int, **kw: Any) -> Any:
        seen.append((start, end))
        return original(target, start, end, **kw)

    monkeypatch.setattr(store, "_get", spy)
    return seen


def bucket_of(ip: InProcess) -> tuple[str, str]:
    assert isinstance(ip.store, S3BlobStore)
    return ip.store.location.bucket, ip.store.location.prefix


async def test_chunks_past_a_gap_are_hashed_from_the_spool_not_read_back(
    s3_settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with inprocess(**s3_settings) as ip:
        data = os.urandom(2 * PART + 4321)
        session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), "spool"))
        assert session.chunk_size == PART
        reads = ranges_read(ip.store, monkeypatch)
        assert isinstance(ip.store, S3BlobStore)
        spool = ip.store.spool
        await put(ip, ip.uploads, session.id, 2, data)  # past the gap: its file is kept
        assert spool.kept_bytes == len(data) - 2 * PART
        await put(ip, ip.uploads, session.id, 0, data)  # hashed in flight: not kept
        assert spool.kept_bytes == len(data) - 2 * PART
        await put(ip, ip.uploads, session.id, 1, data)  # fills the gap; 2 hashed from disk
        assert spool.kept_bytes == 0
        assert list(spool.folder.iterdir()) == []
        row = await ip.session_row(session.id)
        assert row is not None
        assert row["hashed_offset"] == len(data)
        parts = await ip.part_rows("received")
        assert all('"etag"' in p["receipt"] and '"crc32c"' in p["receipt"] for p in parts)
        _, memory = await ip.uploads.finish(ip.caller, session.id, len(data),
                                            hashlib.sha256(data).hexdigest())
        assert reads == []
        assert await ip.read_asset(memory.assets["original"].storage_key, len(data)) == data


async def test_finish_reads_back_only_what_another_process_received(
    s3_settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with inprocess(**s3_settings) as ip, other_process(ip) as other:
        data = os.urandom(3 * PART + 10)
        session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), "x"))
        reads = ranges_read(ip.store, monkeypatch)
        await put(ip, other, session.id, 2, data)
        await put(ip, other, session.id, 3, data)
        await put(ip, ip.uploads, session.id, 0, data)  # at the frontier: hashed in flight
        await put(ip, ip.uploads, session.id, 1, data)
        row = await ip.session_row(session.id)
        assert row is not None
        assert row["hashed_offset"] == 2 * PART  # 2 and 3 are in the other process's spool
        _, memory = await ip.uploads.finish(ip.caller, session.id, len(data),
                                            hashlib.sha256(data).hexdigest())
        assert reads == [(2 * PART, 3 * PART), (3 * PART, len(data))]
        assert await ip.read_asset(memory.assets["original"].storage_key, len(data)) == data


async def test_crash_between_complete_and_transaction_then_finish_again(
    s3_settings: dict[str, Any], database_url: str | None, s3_server: S3Server,
) -> None:
    async with inprocess(database_url=database_url, **s3_settings) as ip:
        data = os.urandom(PART + 77)
        sha = hashlib.sha256(data).hexdigest()
        session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), "crash"))
        for index in (1, 0):
            await put(ip, ip.uploads, session.id, index, data)
        # The dead process completed the multipart upload and got no further:
        receipts = [p["receipt"] for p in sorted(await ip.part_rows("received"),
                                                 key=lambda p: p["offset"])]
        async with other_process(ip) as dead:
            await dead.store.seal(session.staging_key, len(data), receipts)
        bucket, prefix = bucket_of(ip)
        assert s3_server.uploads(bucket, prefix) == []
        status, received, _ = await ip.uploads.status(ip.caller, session.id)
        assert (status.state, received) == ("pending", [0, 1])  # nothing visible yet

        committed, memory = await ip.uploads.finish(ip.caller, session.id, len(data), sha)
        assert committed.state == "committed"
        asset = memory.assets["original"]
        assert await ip.read_asset(asset.storage_key, len(data)) == data
        assert await ip.part_rows() == []


async def test_wrong_digest_after_seal_leaves_the_session_pending(
    s3_settings: dict[str, Any], s3_server: S3Server,
) -> None:
    """A mismatch found after the upload was sealed (bytes another process held) keeps the
    session, and its sealed bytes, for a finish with the right digest; an abort then removes
    the object."""
    async with inprocess(**s3_settings) as ip, other_process(ip) as other:
        bucket, prefix = bucket_of(ip)
        for ending in ("finish", "abort"):
            data = os.urandom(PART + 1)
            sha = hashlib.sha256(data).hexdigest()
            session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), ending))
            await put(ip, other, session.id, 1, data)
            await put(ip, ip.uploads, session.id, 0, data)
            with pytest.raises(ChecksumMismatch):
                await ip.uploads.finish(ip.caller, session.id, len(data), "0" * 64)
            status, received, _ = await ip.uploads.status(ip.caller, session.id)
            assert (status.state, received) == ("pending", [0, 1])
            if ending == "finish":
                _, memory = await ip.uploads.finish(ip.caller, session.id, len(data), sha)
                key = memory.assets["original"].storage_key
                assert await ip.read_asset(key, len(data)) == data
            else:
                await ip.uploads.abort(ip.caller, session.id)
                assert f"{prefix}{session.id}" not in s3_server.objects(bucket, prefix)
        assert s3_server.uploads(bucket, prefix) == []


async def test_same_content_again_is_stored_once(
    s3_settings: dict[str, Any], s3_server: S3Server,
) -> None:
    async with inprocess(**s3_settings) as ip:
        data = os.urandom(PART + 3)
        sha = hashlib.sha256(data).hexdigest()
        keys = []
        for n in range(2):
            session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), f"d{n}"))
            for index in (0, 1):
                await put(ip, ip.uploads, session.id, index, data)
            _, memory = await ip.uploads.finish(ip.caller, session.id, len(data), sha)
            keys.append(memory.assets["original"].storage_key)
        assert keys[0] == keys[1]
        bucket, prefix = bucket_of(ip)
        assert s3_server.objects(bucket, prefix) == [f"{prefix}{keys[0]}"]
        query = sa.select(blobs.c.refcount).where(blobs.c.sha256 == sha)
        assert await ip.db.query(lambda conn: conn.execute(query).scalar_one()) == 2


async def test_a_multipart_upload_the_store_dropped_ends_its_session(
    s3_server: S3Server, s3_settings: dict[str, Any],
) -> None:
    """A bucket lifecycle rule (or MinIO's stale-upload expiry) aborted the upload: the
    session ends, expired and marked lost, instead of answering "try again" for ever."""
    async with inprocess(**s3_settings) as ip:
        data = os.urandom(2 * PART)
        session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), "dropped"))
        await put(ip, ip.uploads, session.id, 0, data)
        bucket, prefix = bucket_of(ip)
        [upload] = s3_server.uploads(bucket, prefix)
        s3_server.client().abort_multipart_upload(
            Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        with pytest.raises(Expired) as info:
            await put(ip, ip.uploads, session.id, 1, data)
        assert info.value.extra.get("lost") is True
        with pytest.raises(Expired):
            await ip.uploads.status(ip.caller, session.id)
        # Another upload of the same file begins afresh.
        again, created = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), "dropped"))
        assert created
        assert again.id != session.id


async def test_an_upload_a_finish_sealed_is_not_taken_for_lost(
    s3_settings: dict[str, Any],
) -> None:
    """Between a finish's CompleteMultipartUpload and its commit the upload id is gone too;
    only an upload gone without its object is lost."""
    async with inprocess(**s3_settings) as ip:
        assert isinstance(ip.store, S3BlobStore)
        data = os.urandom(PART + 10)
        session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), "sealed"))
        for index in range(session.chunk_count):
            await put(ip, ip.uploads, session.id, index, data)
        assert not await ip.store.staging_lost(session.staging_key)
        query = (sa.select(upload_parts.c.receipt)
                 .where(upload_parts.c.session_id == session.id)
                 .order_by(upload_parts.c.offset))
        receipts = await ip.db.query(lambda conn: conn.execute(query).scalars().all())
        await ip.store.seal(session.staging_key, len(data), receipts)
        assert not await ip.store.staging_lost(session.staging_key)
        _, memory = await ip.uploads.finish(ip.caller, session.id, len(data),
                                            hashlib.sha256(data).hexdigest())
        assert memory.assets["original"].size == len(data)


async def test_an_abort_while_the_store_is_down_still_ends_the_session(
    s3_server: S3Server, s3_settings: dict[str, Any],
) -> None:
    """The session ends (its row is the truth); the multipart upload it leaves is the
    staging sweep's. The abort is not a 503 whose retry could only be a 404."""
    async with inprocess(**s3_settings) as ip:
        data = os.urandom(PART)
        session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), "down"))
        down = Settings(**{**s3_settings, "data_dir": ip.settings.data_dir,
                           "s3_endpoint_url": "http://127.0.0.1:9"})
        store = await open_blob_store(down)
        cut_off = UploadService(ip.db, store, ip.clock, ip.settings, ip.capsules)
        try:
            await cut_off.abort(ip.caller, session.id)
        finally:
            await cut_off.sessions.close()
            await close_blob_store(store)
        with pytest.raises(NotFound):
            await ip.uploads.status(ip.caller, session.id)
        bucket, prefix = bucket_of(ip)
        assert len(s3_server.uploads(bucket, prefix)) == 1  # left for the sweep


async def test_a_video_original_is_refused_from_its_first_bytes_not_downloaded(
    s3_settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On S3 the derivative job would fetch the whole original first; a file whose first
    bytes say it is a video is refused without that."""
    async with inprocess(**{**s3_settings, "chunk_size": PART}) as ip:
        video = b"\x00\x00\x00\x18ftypmp42" + os.urandom(PART + 100)
        session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(video), "video"))
        for index in range(session.chunk_count):
            await put(ip, ip.uploads, session.id, index, video)
        _, memory = await ip.uploads.finish(ip.caller, session.id, len(video),
                                            hashlib.sha256(video).hexdigest())
        seen = ranges_read(ip.store, monkeypatch)
        queue = JobQueue(ip.db, ip.clock, lease=30, max_attempts=3, backoff=10)
        runner = DerivativeRunner(queue, ip.store, workers=1, timeout=60, memory_limit=0)
        try:
            job = await queue.claim(runner.worker_id)
            assert job is not None
            await runner._process(job)
        finally:
            await runner.close()
        assert sum(end - start for start, end in seen) <= 64  # the first bytes only
        memory = await ip.capsules.get_memory(ip.caller, memory.id)
        assert memory.derivatives == dict.fromkeys(("display", "thumb", "placeholder"),
                                                   "unsupported")
        assert memory.derivatives_reason is not None
        assert "MP4/QuickTime video" in memory.derivatives_reason


async def test_chunk_size_follows_the_part_limits(s3_settings: dict[str, Any]) -> None:
    async with inprocess(**s3_settings) as ip:
        session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(200 * 1024 * MiB, "big"))
        # 200 GiB in at most 10,000 parts: 5 MiB doubled until it fits.
        assert session.chunk_size == 40 * MiB
        assert session.chunk_count <= 10_000
        await ip.uploads.abort(ip.caller, session.id)
        # 450 GiB: the doubling's last step stops at the 64 MiB maximum (80 MiB would not
        # fit), which holds up to 625 GiB in 10,000 parts; one byte more is refused.
        session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(450 * 1024 * MiB, "450"))
        assert session.chunk_size == 64 * MiB
        assert session.chunk_count <= 10_000
        await ip.uploads.abort(ip.caller, session.id)
        with pytest.raises(PayloadTooLarge) as info:
            await ip.uploads.begin(ip.caller, ip.begin_request(10_000 * 64 * MiB + 1, "over"))
        assert info.value.extra["limit"] == 10_000 * 64 * MiB
    with pytest.raises(ValueError, match="at least 5242880 bytes"):
        await open_blob_store(Settings(**{**s3_settings, "chunk_size": MiB}))


async def test_parts_rows_hold_no_receipt_on_the_local_store() -> None:
    async with inprocess() as ip:
        data = os.urandom(3 * 64 * 1024)
        session, _ = await ip.uploads.begin(ip.caller, ip.begin_request(len(data), "local"))
        await put(ip, ip.uploads, session.id, 0, data)
        query = sa.select(upload_parts.c.receipt)
        assert await ip.db.query(lambda conn: conn.execute(query).scalars().all()) == [None]


async def test_a_part_replaced_after_it_was_received_ends_the_session_as_lost(
    s3_server: S3Server, s3_settings: dict[str, Any],
) -> None:
    """A writer that lost its chunk's claim (paused between reading the body and uploading
    its part) can still upload that part over the taker's, with other bytes. S3 then
    refuses the recorded parts at every finish: that was a 500 until the TTL (a chaos
    review), while the chunks count as received and cannot be sent again. The session ends
    as lost instead, and its client begins again."""
    async with inprocess(**s3_settings) as ip:
        data = os.urandom(PART + 10)
        request = ip.begin_request(len(data), "replaced")
        session, _ = await ip.uploads.begin(ip.caller, request)
        await put(ip, ip.uploads, session.id, 0, data)
        await put(ip, ip.uploads, session.id, 1, data)
        bucket, prefix = bucket_of(ip)
        [upload] = s3_server.uploads(bucket, prefix)
        try:
            s3_server.client().upload_part(  # the late writer's part, over chunk 0's
                Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"], PartNumber=1,
                Body=os.urandom(PART))
        except ClientError as exc:  # rclone's S3 server streams parts: none is replaced
            if exc.response["Error"]["Code"] != "NotImplemented":
                raise
            pytest.skip("this S3 server lets no part be replaced once uploaded")
        with pytest.raises(Expired) as info:
            await ip.uploads.finish(ip.caller, session.id, len(data),
                                    hashlib.sha256(data).hexdigest())
        assert info.value.extra.get("lost") is True
        assert "refused its recorded parts" in info.value.detail
        with pytest.raises(Expired):
            await ip.uploads.status(ip.caller, session.id)
        again, created = await ip.uploads.begin(ip.caller, request)
        assert created
        assert again.id != session.id
