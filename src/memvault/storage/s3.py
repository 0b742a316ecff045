"""S3-compatible blob store: one multipart upload per upload session.

Layout under ``s3://bucket/prefix/``::

    <name>    ses_… (an upload session) or drv_… (a derivative): a multipart upload while
              parts arrive, one object once sealed; a committed blob's storage key is <name>

The staging key is ``<name>:<upload id>``, so every process can address the upload. Chunk
``i`` is part ``i + 1``; ``seal`` completes the upload with the receipts the core recorded
(part number, ETag, CRC32C); ``commit`` has nothing left to move: the sealed object *is* the
blob (no server-side copy, so finish does not grow with the file). Content-addressed dedup
lives in the metadata (blobs maps SHA-256 → storage key); the core drops a second copy.

Each part is spooled to a local file while it arrives, then uploaded from it. The file gives
botocore the seekable body it needs to retry and lets the part's CRC32C go in a header before
the body; memory stays at the write batches, the disk holds one chunk per part in flight.
After the upload the file is kept for a while: parts that arrived past the hash frontier are
hashed from it when the gap before them fills (an unfinished multipart upload cannot be read
back). A part this process does not hold is read back from the object after ``seal``.

botocore and aiohttp errors are mapped here, in one place, to the port's exceptions and to
``Unavailable`` (503 with Retry-After): a flaky store is the client's cue to retry.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from memvault.errors import Unavailable
from memvault.hashing import Sha256State
from memvault.storage.base import (
    BlobDamaged,
    BlobMissing,
    StagedDamaged,
    StagedUnavailable,
    StagingGone,
)
from memvault.storage.spool import Spool, SpooledPart

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = structlog.get_logger("memvault.storage")

MiB = 1024 * 1024
MIN_PART = 5 * MiB
MAX_PART = 5 * 1024 * MiB
MAX_PARTS = 10_000
_AUDIT_LOOKUPS = 16
"""HEAD requests ``memvault blobs check`` has in flight at once."""
_READ_PIECE = MiB
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
_GONE = {"NoSuchUpload", "NoSuchKey", "404"}
_REFUSED_PARTS = {"InvalidPart", "InvalidPartOrder", "EntityTooSmall"}
_FAILURES = (BotoCoreError, ClientError, aiohttp.ClientError)


@dataclass(frozen=True)
class S3Location:
    """Where blobs live: ``s3://bucket/prefix`` (the prefix may be empty)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        if not url.startswith("s3://"):
            raise ValueError(f"not an s3:// URL: {url!r}")
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"no bucket in {url!r}")
        prefix = prefix.strip("/")
        return cls(bucket, f"{prefix}/" if prefix else "")


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    region: str | None = None
    checksum: bool = True
    """Send a CRC32C with every part (the store verifies it); off for stores without it."""
    spool_dir: Path | None = None
    keep_bytes: int = 256 * MiB
    """Uploaded parts kept on local disk for the hash frontier, at most (oldest go first)."""
    keep_seconds: float = 900.0
    connections: int = 64
    attempts: int = 3


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _unavailable(what: str, exc: BaseException) -> Unavailable:
    # The store's own message (endpoints, upload ids) goes to the log, not to the client.
    log.warning("s3.failed", what=what, error=f"{type(exc).__name__}: {exc}")
    return Unavailable(f"the blob store failed to {what} ({type(exc).__name__}); try again",
                       retry_after=5)


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Anything the S3 client raises that the caller did not handle becomes a 503."""
    try:
        yield
    except _FAILURES as exc:
        raise _unavailable(what, exc) from exc


def _whole_length(content_range: str | None) -> int | None:
    """The object's length from a ranged GET's ``Content-Range: bytes a-b/N``; None if the
    store did not say (``*``, or no header)."""
    total = (content_range or "").rpartition("/")[2]
    return int(total) if total.isdigit() else None


def _split(staging_key: str) -> tuple[str, str]:
    name, sep, upload_id = staging_key.partition(":")
    if not sep or not upload_id or not _NAME.match(name):
        raise ValueError(f"bad staging key {staging_key!r}")
    return name, upload_id


class S3BlobStore:
    """Blob store on an S3-compatible object store (AWS S3, MinIO, Ceph RGW, Garage, R2...).

    Create, then ``await store.open()`` before use and ``await store.close()`` after.
    Credentials come from the standard AWS chain (environment, shared config, instance role).
    """

    name = "s3"
    min_part_size = MIN_PART
    max_part_size = MAX_PART
    max_parts = MAX_PARTS

    def __init__(self, location: S3Location, options: S3Options | None = None) -> None:
        self.location = location
        self.options = options or S3Options()
        self._stack = contextlib.AsyncExitStack()
        self._client: S3Client | None = None
        self.spool = Spool(
            self.options.spool_dir or Path(tempfile.gettempdir()) / "memvault-spool",
            keep_bytes=self.options.keep_bytes, keep_seconds=self.options.keep_seconds,
        )
        self._sealed: dict[str, None] = {}  # insertion-ordered set, bounded

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        await self.spool.open()
        path_style = {"addressing_style": "path"} if self.options.endpoint_url else {}
        config = AioConfig(
            # Checksums are ours to choose: a CRC32C per part (below), none on reads (the
            # SHA-256 of every byte is checked by whoever reads for hashing).
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": "standard", "max_attempts": self.options.attempts},
            max_pool_connections=self.options.connections,
            connect_timeout=10,
            read_timeout=60,
            # With a CRC32C on every part the body need not be hashed again for the signature
            # (botocore would read each part once more, on the event loop, over plain HTTP).
            s3={**path_style, "payload_signing_enabled": not self.options.checksum},
        )
        self._client = await self._stack.enter_async_context(
            get_session().create_client(
                "s3", endpoint_url=self.options.endpoint_url,
                region_name=self.options.region, config=config,
            )
        )

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None
        await self.spool.close()

    @property
    def client(self) -> S3Client:
        if self._client is None:
            raise RuntimeError("S3BlobStore.open() was not called")
        return self._client

    def _object(self, name: str) -> str:
        return self.location.prefix + name

    # -- staging ---------------------------------------------------------------------------

    async def stage(self, key: str) -> str:
        if not _NAME.match(key):
            raise ValueError(f"bad staging key {key!r}")
        extra: dict[str, Any] = {"ChecksumAlgorithm": "CRC32C"} if self.options.checksum else {}
        with _mapped("begin an upload"):
            answer = await self.client.create_multipart_upload(
                Bucket=self.location.bucket, Key=self._object(key), **extra)
        return f"{key}:{answer['UploadId']}"

    async def open_writer(self, key: str, offset: int, *, length: int, part: int,
                          hashed: bool = False) -> SpooledPart:
        if not 0 <= part < MAX_PARTS:
            raise ValueError(f"part {part} is outside S3's 1..{MAX_PARTS}")
        name, _ = _split(key)

        async def upload(path: Path, crc: int) -> str:
            return await self.upload_part(key, part, path, length, crc)

        # A part hashed as it streamed is never read here again: its spool file goes as soon
        # as it is uploaded. Others stay until the frontier has hashed them.
        return SpooledPart(self.spool, name, offset, length, upload, keep=not hashed)

    async def upload_part(self, staging_key: str, part: int, path: Path, length: int,
                          crc: int) -> str:
        """Upload a spooled part; returns its receipt (JSON: part number, ETag, CRC32C)."""
        name, upload_id = _split(staging_key)
        number = part + 1
        extra: dict[str, Any] = {}
        checksum = base64.b64encode(crc.to_bytes(4, "big")).decode()
        if self.options.checksum:
            extra["ChecksumCRC32C"] = checksum
        try:
            with path.open("rb") as body:
                answer = await self.client.upload_part(
                    Bucket=self.location.bucket, Key=self._object(name), UploadId=upload_id,
                    PartNumber=number, Body=body, ContentLength=length, **extra)
        except _FAILURES as exc:
            if await self._upload_gone(name, upload_id):
                raise StagingGone(staging_key) from exc
            raise _unavailable(f"store part {number}", exc) from exc
        receipt = {"n": number, "etag": answer["ETag"]}
        if self.options.checksum:
            receipt["crc32c"] = answer.get("ChecksumCRC32C") or checksum
        return json.dumps(receipt, separators=(",", ":"))

    async def staging_lost(self, key: str) -> bool:
        """The multipart upload is gone and no object was completed from it: aborted (a
        lifecycle rule, MinIO's stale-upload expiry), not finished by a finish that has
        not committed yet."""
        name, upload_id = _split(key)
        if not await self._upload_gone(name, upload_id):
            return False
        try:
            return await self._object_size(self._object(name)) is None
        except Unavailable:
            return False

    async def _upload_gone(self, name: str, upload_id: str) -> bool:
        """Whether the multipart upload no longer exists (aborted, or completed). Asked after
        a failure, since some stores answer a request to a gone upload with a 500."""
        try:
            await self.client.list_parts(Bucket=self.location.bucket, Key=self._object(name),
                                         UploadId=upload_id, MaxParts=1)
        except ClientError as exc:
            return _code(exc) in _GONE
        except _FAILURES:
            return False
        return False

    async def seal(self, key: str, size: int, receipts: Sequence[str | None]) -> None:
        name, upload_id = _split(key)
        bucket, target = self.location.bucket, self._object(name)
        if not receipts:
            # S3 cannot complete an upload of no parts: an empty object is a plain PUT. The
            # upload goes first, so a crash in between leaves nothing behind to sweep.
            with _mapped("store an empty object"):
                await self._abort(target, upload_id)
                await self.client.put_object(Bucket=bucket, Key=target, Body=b"")
            self._mark_sealed(name)
            return
        parts = [self._part_entry(r) for r in receipts]
        try:
            await self.client.complete_multipart_upload(
                Bucket=bucket, Key=target, UploadId=upload_id,
                MultipartUpload={"Parts": parts})  # type: ignore[typeddict-item]
        except _FAILURES as exc:
            # A retry after a crash (or a concurrent finish) finds the upload completed.
            if await self._object_size(target) == size:
                self._mark_sealed(name)
                return
            if isinstance(exc, ClientError) and _code(exc) in _REFUSED_PARTS:
                # The recorded parts do not match the stored ones (a writer that lost its
                # chunk's claim still uploaded its part over the taker's): retrying cannot
                # help, and the chunks count as received, so they cannot be sent again.
                log.error("s3.parts_refused", key=key, error=str(exc))
                raise StagedDamaged(key, "the store refused its recorded parts "
                                         f"({_code(exc)})") from exc
            if await self._upload_gone(name, upload_id):
                raise StagingGone(key) from exc
            raise _unavailable("complete an upload", exc) from exc
        self._mark_sealed(name)

    def _part_entry(self, receipt: str | None) -> dict[str, Any]:
        if receipt is None:
            raise ValueError("a part without a receipt cannot be sealed into an S3 object")
        fields = json.loads(receipt)
        entry: dict[str, Any] = {"PartNumber": int(fields["n"]), "ETag": str(fields["etag"])}
        if "crc32c" in fields:
            entry["ChecksumCRC32C"] = str(fields["crc32c"])
        return entry

    def _mark_sealed(self, name: str) -> None:
        self._sealed[name] = None
        while len(self._sealed) > 10_000:
            del self._sealed[next(iter(self._sealed))]

    async def _object_size(self, target: str) -> int | None:
        try:
            head = await self.client.head_object(Bucket=self.location.bucket, Key=target)
        except ClientError as exc:
            if _code(exc) in _GONE:
                return None
            raise _unavailable("look up an object", exc) from exc
        except _FAILURES as exc:
            raise _unavailable("look up an object", exc) from exc
        return int(head["ContentLength"])

    async def blob_sizes(self, storage_keys: Sequence[str]) -> dict[str, int]:
        sizes = await self._sizes(storage_keys)
        return {key: size for key, size in zip(storage_keys, sizes, strict=True)
                if size is not None}

    async def missing_blobs(self, storage_keys: Sequence[str]) -> list[str]:
        sizes = await self._sizes(storage_keys)
        return [key for key, size in zip(storage_keys, sizes, strict=True) if size is None]

    async def _sizes(self, storage_keys: Sequence[str]) -> list[int | None]:
        """Each blob's stored size (None: not there), a few lookups at a time."""
        lookups = asyncio.Semaphore(_AUDIT_LOOKUPS)

        async def size(key: str) -> int | None:
            async with lookups:
                return await self._object_size(self._object(key))

        return list(await asyncio.gather(*(size(key) for key in storage_keys)))

    async def hash_blob(self, storage_key: str) -> tuple[int, str]:
        target = self._object(storage_key)
        size = await self._object_size(target)
        if size is None:
            raise BlobMissing(storage_key)
        state = Sha256State()
        read = 0
        if size:
            async for piece in self._get(target, 0, size, blob=storage_key):
                state.update(piece)
                read += len(piece)
        return read, state.hexdigest()

    async def _abort(self, target: str, upload_id: str) -> None:
        try:
            await self.client.abort_multipart_upload(
                Bucket=self.location.bucket, Key=target, UploadId=upload_id)
        except ClientError as exc:
            if _code(exc) not in _GONE:
                raise

    async def commit(self, key: str, sha256: str, size: int) -> str:
        # Sealed means complete: the object stays where it is and is the blob.
        name, _ = _split(key)
        self._forget(name)
        return name

    def _forget(self, name: str) -> None:
        self.spool.forget(name)
        self._sealed.pop(name, None)

    async def discard(self, key: str) -> None:
        name, upload_id = _split(key)
        self._forget(name)
        with _mapped("discard an upload"):
            await self._abort(self._object(name), upload_id)
            await self.client.delete_object(Bucket=self.location.bucket,
                                            Key=self._object(name))

    async def staged_keys(self, older_than: float) -> list[str]:
        self.spool.prune()  # the reaper calls this every minute or so
        keys: list[str] = []
        paginator = self.client.get_paginator("list_multipart_uploads")
        with _mapped("list unfinished uploads"):
            async for page in paginator.paginate(Bucket=self.location.bucket,
                                                 Prefix=self.location.prefix):
                for upload in page.get("Uploads", []):
                    name = upload["Key"][len(self.location.prefix):]
                    if _NAME.match(name) and upload["Initiated"].timestamp() < older_than:
                        keys.append(f"{name}:{upload['UploadId']}")
        return keys

    # -- reading staged bytes (the hash frontier) ------------------------------------------

    async def read_staged(self, key: str, offset: int, length: int) -> AsyncIterator[bytes]:
        name, _ = _split(key)
        kept = self.spool.pieces(name, offset, length)
        if kept is None:
            if name not in self._sealed:
                raise StagedUnavailable(key)
            kept = self._get(self._object(name), offset, offset + length, staged=key)
        async for piece in kept:
            yield piece

    def holds_staged(self, key: str, offset: int) -> bool:
        name, _ = _split(key)
        return self.spool.holds(name, offset)

    async def hash_staged(self, key: str, offset: int, length: int, state: Sha256State) -> None:
        name, _ = _split(key)
        if await self.spool.hash(name, offset, length, state):
            return
        if name not in self._sealed:
            raise StagedUnavailable(key)
        async for piece in self._get(self._object(name), offset, offset + length, staged=key):
            await asyncio.to_thread(state.update, piece)

    # -- committed blobs -------------------------------------------------------------------

    async def read(self, storage_key: str, start: int, end: int, *,
                   size: int | None = None) -> AsyncIterator[bytes]:
        if not _NAME.match(storage_key):
            raise ValueError(f"bad blob key {storage_key!r}")
        target = self._object(storage_key)
        if start >= end:
            stored = await self._object_size(target)
            if stored is None:
                raise BlobMissing(storage_key)
            if size is not None and stored != size:
                raise BlobDamaged(storage_key, stored, size, where="in the bucket")
            return
        async for piece in self._get(target, start, end, blob=storage_key, size=size):
            yield piece

    async def _get(self, target: str, start: int, end: int, *, blob: str | None = None,
                   staged: str | None = None, size: int | None = None) -> AsyncIterator[bytes]:
        """Stream ``[start, end)`` of an object with a ranged GET; with ``size``, the
        object's whole length (in the answer's Content-Range) must be that."""
        try:
            answer = await self.client.get_object(Bucket=self.location.bucket, Key=target,
                                                  Range=f"bytes={start}-{end - 1}")
        except ClientError as exc:
            if _code(exc) in _GONE:
                if blob is not None:
                    raise BlobMissing(blob) from exc
                raise StagedUnavailable(staged) from exc
            if blob is not None and size is not None and _code(exc) == "InvalidRange":
                # The range starts past the object's end: it is shorter than recorded.
                stored = await self._object_size(target)
                if stored is None:
                    raise BlobMissing(blob) from exc
                if stored != size:
                    raise BlobDamaged(blob, stored, size, where="in the bucket") from exc
            raise _unavailable("read an object", exc) from exc
        except _FAILURES as exc:
            raise _unavailable("read an object", exc) from exc
        if blob is not None and size is not None:
            stored = _whole_length(answer.get("ContentRange"))
            if stored is not None and stored != size:
                answer["Body"].close()
                raise BlobDamaged(blob, stored, size, where="in the bucket")
        seen = 0
        with _mapped("read an object"):
            async with answer["Body"] as body:
                async for piece in body.iter_chunks(_READ_PIECE):
                    seen += len(piece)
                    yield piece
        if seen != end - start:
            raise _unavailable("read an object",
                               EOFError(f"{seen} of {end - start} bytes from {target}"))

    async def free_bytes(self) -> int | None:
        return None  # a bucket has no headroom to reserve against

    async def check(self) -> None:
        try:
            await self.client.head_bucket(Bucket=self.location.bucket)
        except _FAILURES as exc:
            raise OSError(f"s3://{self.location.bucket}: {type(exc).__name__}: {exc}") from exc
