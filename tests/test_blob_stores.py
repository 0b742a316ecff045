"""The blob store port's contract, run against every backend: the local folder, and the S3
store on two S3 implementations (moto and ``rclone serve s3``).

Parts are 5 MiB, S3's smallest (every part but the last); the local store takes any size.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import mmap
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from memvault.errors import Unavailable
from memvault.hashing import new_sha256
from memvault.storage.base import BlobMissing, BlobStore, StagedHasher, StagingGone
from memvault.storage.local import LocalBlobStore
from memvault.storage.s3 import S3BlobStore, S3Location, S3Options
from memvault.storage.spool import Spool, SpooledPart
from tests.s3server import REGION, S3Server

MiB = 1024 * 1024
PART = 5 * MiB


@dataclass
class Backend:
    store: BlobStore
    missing_key: str
    """A well-formed storage key of a blob that does not exist."""


@pytest.fixture(params=["local", "moto", "rclone"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "local":
        yield Backend(LocalBlobStore(tmp_path / "blobs"), "blobs/ab/cc/ab" + "c" * 62)
        return
    s3: S3Server = request.getfixturevalue(
        "s3_server" if request.param == "moto" else "rclone_server")
    store = S3BlobStore(S3Location(s3.new_bucket(), "contract/"),
                        S3Options(endpoint_url=s3.endpoint_url, region=REGION,
                                  spool_dir=tmp_path / "spool", attempts=2))
    await store.open()
    try:
        yield Backend(store, "ses_0123456789abcdef")
    finally:
        await store.close()


async def write_part(store: BlobStore, key: str, data: bytes, part: int,
                     size: int = PART) -> str | None:
    offset = part * size
    chunk = data[offset:offset + size]
    writer = await store.open_writer(key, offset, length=len(chunk), part=part)
    # Pieces of uneven size, as a request body arrives.
    for start in range(0, len(chunk), 3 * MiB + 7):
        await writer.write([chunk[start:start + 3 * MiB + 7]])
    return await writer.close(durable=True)


async def staged(store: BlobStore, data: bytes, order: list[int],
                 name: str) -> tuple[str, list[str | None]]:
    """A staging area holding ``data`` written part by part in ``order``; its receipts in
    offset order."""
    key = await store.stage(name)
    receipts: dict[int, str | None] = {}
    for part in order:
        receipts[part] = await write_part(store, key, data, part)
    return key, [receipts[p] for p in sorted(receipts)]


async def seal_and_commit(store: BlobStore, key: str, data: bytes,
                          receipts: list[str | None]) -> str:
    """What finish asks of the store (a store may notice a discarded area at either step)."""
    await store.seal(key, len(data), receipts)
    return await store.commit(key, hashlib.sha256(data).hexdigest(), len(data))


async def read_all(store: BlobStore, storage_key: str, start: int, end: int) -> bytes:
    return b"".join([piece async for piece in store.read(storage_key, start, end)])


async def test_parts_out_of_order_seal_commit_and_read_ranges(backend: Backend) -> None:
    store = backend.store
    data = os.urandom(2 * PART + 12345)
    sha = hashlib.sha256(data).hexdigest()
    key, receipts = await staged(store, data, [2, 0, 1], "ses_order")
    await store.seal(key, len(data), receipts)
    storage_key = await store.commit(key, sha, len(data))
    assert await read_all(store, storage_key, 0, len(data)) == data
    for start, end in [(0, 1), (PART - 3, PART + 3), (2 * PART, len(data)),
                       (len(data) - 1, len(data)), (17, 2 * PART + 100)]:
        assert await read_all(store, storage_key, start, end) == data[start:end]
    assert key not in await store.staged_keys(time.time() + 60)


async def test_staged_bytes_read_back_and_hashed(backend: Backend) -> None:
    """Parts written through a store can be read (and hashed) back before the seal, which
    is what the hash frontier does with chunks that arrived past a gap; all can after it."""
    store = backend.store
    data = os.urandom(2 * PART + 99)
    key, receipts = await staged(store, data, [1, 2, 0], "ses_readback")
    state = new_sha256()
    for part in range(3):
        offset, length = part * PART, min(PART, len(data) - part * PART)
        pieces = [p async for p in store.read_staged(key, offset, length)]
        assert b"".join(pieces) == data[offset:offset + length]
        if isinstance(store, StagedHasher):
            await store.hash_staged(key, offset, length, state)
        else:
            state.update(b"".join(pieces))
    assert state.hexdigest() == hashlib.sha256(data).hexdigest()
    await store.seal(key, len(data), receipts)
    tail = b"".join([p async for p in store.read_staged(key, PART - 10, 20)])
    assert tail == data[PART - 10:PART + 10]


async def test_seal_and_commit_are_idempotent(backend: Backend) -> None:
    """A finish retried after a crash between the store's commit and the metadata
    transaction finds the blob in place."""
    store = backend.store
    data = os.urandom(PART + 1)
    sha = hashlib.sha256(data).hexdigest()
    key, receipts = await staged(store, data, [0, 1], "ses_again")
    await store.seal(key, len(data), receipts)
    first = await store.commit(key, sha, len(data))
    await store.seal(key, len(data), receipts)
    assert await store.commit(key, sha, len(data)) == first
    assert await read_all(store, first, 0, len(data)) == data


async def test_same_content_twice_then_the_second_staging_discarded(backend: Backend) -> None:
    """The core's dedup: a second commit of known content is discarded after the metadata
    names the first; the first blob stays readable whatever the store's keys are."""
    store = backend.store
    data = os.urandom(PART + 7)
    sha = hashlib.sha256(data).hexdigest()
    blobs = []
    for name in ("ses_dup_a", "ses_dup_b"):
        key, receipts = await staged(store, data, [1, 0], name)
        await store.seal(key, len(data), receipts)
        blobs.append((key, await store.commit(key, sha, len(data))))
    (_, first), (second_staging, second) = blobs
    if first != second:
        await store.discard(second_staging)
        with pytest.raises(BlobMissing):
            await read_all(store, second, 0, 10)
    assert await read_all(store, first, 0, len(data)) == data


async def test_discard_removes_staging_and_writes_after_it_fail(backend: Backend) -> None:
    store = backend.store
    data = os.urandom(PART + 5)
    key, receipts = await staged(store, data, [0], "ses_gone")
    await store.discard(key)
    await store.discard(key)  # idempotent
    assert key not in await store.staged_keys(time.time() + 60)
    with pytest.raises(StagingGone):
        await write_part(store, key, data, 1)
    with pytest.raises(StagingGone):
        await seal_and_commit(store, key, data, [*receipts, receipts[0]])


async def test_discard_after_seal_removes_the_sealed_bytes(backend: Backend) -> None:
    """A session aborted after finish sealed it (a checksum mismatch) leaves nothing."""
    store = backend.store
    data = os.urandom(PART + 5)
    key, receipts = await staged(store, data, [1, 0], "ses_sealed_then_aborted")
    await store.seal(key, len(data), receipts)
    await store.discard(key)
    with pytest.raises(StagingGone):
        await seal_and_commit(store, key, data, receipts)


async def test_an_abandoned_part_counts_for_nothing(backend: Backend) -> None:
    store = backend.store
    data = os.urandom(PART + 3)
    key = await store.stage("ses_abandon")
    writer = await store.open_writer(key, 0, length=PART, part=0)
    await writer.write([os.urandom(MiB)])
    await writer.abandon()
    receipts = [await write_part(store, key, data, 0), await write_part(store, key, data, 1)]
    await store.seal(key, len(data), receipts)
    storage_key = await store.commit(key, hashlib.sha256(data).hexdigest(), len(data))
    assert await read_all(store, storage_key, 0, len(data)) == data


async def test_zero_byte_blob(backend: Backend) -> None:
    store = backend.store
    key = await store.stage("ses_empty")
    await store.seal(key, 0, [])
    storage_key = await store.commit(key, hashlib.sha256(b"").hexdigest(), 0)
    assert await read_all(store, storage_key, 0, 0) == b""
    assert key not in await store.staged_keys(time.time() + 60)


async def test_staged_keys_lists_areas_begun_before_the_cutoff(backend: Backend) -> None:
    store = backend.store
    a, b = await store.stage("ses_list_a"), await store.stage("drv_list_b")
    listed = await store.staged_keys(time.time() + 60)
    assert {a, b} <= set(listed)
    assert await store.staged_keys(0) == []
    await store.discard(a)
    await store.discard(b)
    listed = await store.staged_keys(time.time() + 60)
    assert a not in listed
    assert b not in listed


async def test_missing_blob_is_reported_not_served(backend: Backend) -> None:
    with pytest.raises(BlobMissing):
        await read_all(backend.store, backend.missing_key, 0, 10)
    with pytest.raises(BlobMissing):
        await read_all(backend.store, backend.missing_key, 0, 0)


async def test_reachable(backend: Backend) -> None:
    await backend.store.check()


async def test_local_store_unlinks_dropped_staging_files_in_the_background(
    tmp_path: Path,
) -> None:
    """Unlinking a large, just-synced file takes the file system long; a finish of content
    already stored, or an abort, only renames its staging file into trash/."""
    store = LocalBlobStore(tmp_path / "blobs")
    data = os.urandom(PART + 3)
    sha = hashlib.sha256(data).hexdigest()
    first, _ = await staged(store, data, [1, 0], "ses_keep")
    kept = await store.commit(first, sha, len(data))
    second, _ = await staged(store, data, [0, 1], "ses_same")
    assert await store.commit(second, sha, len(data)) == kept
    third, _ = await staged(store, data, [0], "ses_abort")
    await store.discard(third)
    await store.drained()
    assert list((tmp_path / "blobs" / "staging").iterdir()) == []
    assert list((tmp_path / "blobs" / "trash").iterdir()) == []
    assert await read_all(store, kept, 0, len(data)) == data
    # What a crash leaves in trash/ goes with the reaper's next sweep.
    (tmp_path / "blobs" / "trash" / "ses_crashed.0badf00d").write_bytes(b"x" * 100)
    await store.staged_keys(time.time())
    assert list((tmp_path / "blobs" / "trash").iterdir()) == []


async def test_local_store_sweep_puts_back_blob_files_a_collector_left_aside(
    tmp_path: Path,
) -> None:
    """A collector that crashed between moving a blob file aside and deciding leaves it in
    aside/. The sweep never deletes such a file while its place is empty (without its row
    it cannot tell whether a commit uses it): it puts it back; where a copy of the content
    is in place again, the aside file goes. Files set aside since the cutoff are left to
    their collector."""
    store = LocalBlobStore(tmp_path / "blobs")
    aside = tmp_path / "blobs" / "aside"
    contents = [os.urandom(100 + n) for n in range(3)]
    keys = []
    for n, data in enumerate(contents):
        staged_key, _ = await staged(store, data, [0], f"ses_{n}")
        keys.append(await store.commit(staged_key, hashlib.sha256(data).hexdigest(), len(data)))
    shas = [hashlib.sha256(d).hexdigest() for d in contents]
    old, young = int(time.time()) - 7200, int(time.time())
    # 0: set aside long ago, its place empty. 1: set aside long ago, a copy back in place.
    # 2: set aside just now.
    os.replace(store.blob_path(keys[0]), aside / f"{shas[0]}.{old}.00000000")
    shutil.copy(store.blob_path(keys[1]), aside / f"{shas[1]}.{old}.00000001")
    os.replace(store.blob_path(keys[2]), aside / f"{shas[2]}.{young}.00000002")
    (aside / "not-a-blob").write_bytes(b"?")

    await store.staged_keys(time.time() - 3600)
    assert await read_all(store, keys[0], 0, len(contents[0])) == contents[0]
    assert await read_all(store, keys[1], 0, len(contents[1])) == contents[1]
    assert not store.blob_path(keys[2]).exists()
    assert sorted(p.name for p in aside.iterdir()) == [f"{shas[2]}.{young}.00000002",
                                                       "not-a-blob"]


async def test_a_chunk_range_has_one_writer_at_a_time(tmp_path: Path) -> None:
    """While a writer of a chunk's range has its descriptor open (it may be standing still,
    its claim lapsed), a second writer of that range is refused (503, send again), so the
    first one's late bytes can never land on the second's; other ranges are free. Once the
    first is closed (or its process gone), the range is free again."""
    store = LocalBlobStore(tmp_path / "blobs")
    data = os.urandom(2 * PART)
    key = await store.stage("ses_ranges")
    late = await store.open_writer(key, 0, length=PART, part=0)
    await late.write([os.urandom(1000)])
    with pytest.raises(Unavailable) as refused:
        await store.open_writer(key, 0, length=PART, part=0)
    assert refused.value.headers() == {"Retry-After": "1"}
    other = await store.open_writer(key, PART, length=PART, part=1)
    await other.write([data[PART:]])
    await other.close(durable=True)
    await late.abandon()
    again = await store.open_writer(key, 0, length=PART, part=0)
    await again.write([data[:PART]])
    await again.close(durable=True)
    kept = await store.commit(key, hashlib.sha256(data).hexdigest(), len(data))
    assert await read_all(store, kept, 0, len(data)) == data


def resident_pages(path: Path, offset: int, length: int) -> int:
    """How many pages of ``[offset, offset+length)`` of ``path`` are in the page cache
    (``mincore`` over a private mapping, which reads the cache and loads nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    with path.open("rb") as f, mmap.mmap(f.fileno(), length, access=mmap.ACCESS_COPY,
                                         offset=offset) as mapped:
        vec = (ctypes.c_ubyte * ((length + page - 1) // page))()
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
        assert libc.mincore(address, length, vec) == 0, os.strerror(ctypes.get_errno())
        return sum(v & 1 for v in vec)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
async def test_staged_bytes_leave_the_page_cache_once_no_one_will_read_them(
    tmp_path: Path,
) -> None:
    """An upload's bytes are written once and read rarely; kept in the page cache they would
    push out what the machine does read, and make every next write claim pages the system
    has never touched. A chunk hashed as it streamed goes once it is durable; one that the
    frontier must still read back stays until it has; commit lets go of the rest."""
    store = LocalBlobStore(tmp_path / "blobs")
    data = os.urandom(3 * PART)
    key = await store.stage("ses_cache")
    staging = tmp_path / "blobs" / "staging" / key
    pages = PART // mmap.PAGESIZE
    for part in range(3):
        writer = await store.open_writer(key, part * PART, length=PART, part=part,
                                         hashed=part == 0)
        await writer.write([data[part * PART:(part + 1) * PART]])
        assert resident_pages(staging, part * PART, PART) == pages
        await writer.close(durable=True)
    assert [resident_pages(staging, p * PART, PART) for p in range(3)] == [0, pages, pages]
    state = new_sha256()
    state.update(data[:PART])
    await store.hash_staged(key, PART, PART, state)
    assert state.hexdigest() == hashlib.sha256(data[:2 * PART]).hexdigest()
    assert [resident_pages(staging, p * PART, PART) for p in range(3)] == [0, 0, pages]
    sha = hashlib.sha256(data).hexdigest()
    kept = await store.commit(key, sha, len(data))
    await store.drained()  # after the answer, in the background
    assert resident_pages(store.blob_path(kept), 0, len(data)) == 0
    assert await read_all(store, kept, 0, len(data)) == data


@pytest.mark.parametrize("writer_kind", ["local", "s3 spool"])
async def test_a_cancelled_write_keeps_its_descriptor_until_the_thread_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer_kind: str,
) -> None:
    """A chunk's transfer is cancelled (its timeout, say) while a batch is being written on
    a worker thread, and the writer is abandoned at once. The cancellation goes ahead (a hung
    disk must not hold the request), but the descriptor is closed only when the thread's
    write returns: closed under it, its number would be reused by the next ``open`` and the
    late bytes would land in that file (found by review: another session's staging file)."""
    if writer_kind == "local":
        store = LocalBlobStore(tmp_path / "blobs")
        key = await store.stage("ses_cancelled")
        writer: Any = await store.open_writer(key, 0, length=PART, part=0)
    else:
        spool = Spool(tmp_path / "spool", keep_bytes=0, keep_seconds=0)
        await spool.open()

        async def upload(path: Path, crc: int) -> str:
            return "etag"

        writer = SpooledPart(spool, "ses_cancelled", 0, PART, upload, keep=False)
    inside, go_on = threading.Event(), threading.Event()
    write_calls = {"local": "pwritev", "s3 spool": "write"}[writer_kind]
    real = getattr(os, write_calls)
    landed: list[int] = []

    def slow(fd: int, *args: Any) -> int:
        inside.set()
        go_on.wait(10)
        landed.append(fd)
        return int(real(fd, *args))

    monkeypatch.setattr(os, write_calls, slow)
    writing = asyncio.create_task(writer.write([os.urandom(1000)]))
    await asyncio.to_thread(inside.wait, 10)
    writing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writing  # at once, though the thread is still writing
    await writer.abandon()
    other = os.open(tmp_path / "opened-meanwhile", os.O_CREAT | os.O_WRONLY, 0o600)
    go_on.set()
    await asyncio.sleep(0.2)  # the thread returns; then its descriptor closes
    monkeypatch.undo()
    os.close(other)
    assert landed, "the write never returned"
    assert landed[0] != other, "the descriptor was closed under the thread and reused"
    assert (tmp_path / "opened-meanwhile").stat().st_size == 0


def test_the_local_store_tells_a_writer_process_that_ended(tmp_path: Path) -> None:
    """Each local store holds a lock on ``writers/<its id>`` for as long as its process
    lives: another store sees it alive while it runs, ended once it is killed (the kernel
    let go of the lock; the file is then swept) or has closed its store."""
    script = ("import sys, time; from pathlib import Path; "
              "from memvault.storage.local import LocalBlobStore; "
              "s = LocalBlobStore(Path(sys.argv[1])); print(s.writer_id, flush=True); "
              "time.sleep(60)")
    other = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    store = LocalBlobStore(tmp_path)

    def gone(writer: str) -> bool:
        return asyncio.run(store.writer_gone(writer))

    try:
        assert other.stdout is not None
        writer = other.stdout.readline().strip()
        assert gone(writer) is False
        assert gone(store.writer_id) is False  # never its own
        assert gone("../admin.token") is False
        other.kill()
        other.wait(30)
        assert gone(writer) is True
        assert not (tmp_path / "writers" / writer).exists()
        assert gone(writer) is True  # and stays so, swept

        third = LocalBlobStore(tmp_path)
        assert gone(third.writer_id) is False
        asyncio.run(third.close())
        assert gone(third.writer_id) is True
    finally:
        other.kill()
        other.wait(30)
        if other.stdout is not None:
            other.stdout.close()
        asyncio.run(store.close())
