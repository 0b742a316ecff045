"""Build the blob store the settings name: the data folder by default, or an S3 bucket."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from memvault.settings import Settings
from memvault.storage.base import BlobStore, PartLimits
from memvault.storage.local import LocalBlobStore


@runtime_checkable
class _Closable(Protocol):
    async def close(self) -> None: ...


async def open_blob_store(settings: Settings) -> BlobStore:
    """The store for ``settings.blob_store``, opened; give it back to ``close_blob_store``."""
    store: BlobStore
    if settings.s3_location is None:
        store = LocalBlobStore(settings.data_dir)
    else:
        # Imported here: aiobotocore is the `s3` extra, not needed by the embedded default.
        from memvault.storage.s3 import S3BlobStore, S3Location, S3Options

        s3 = S3BlobStore(
            S3Location.parse(settings.s3_location),
            S3Options(
                endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                checksum=settings.s3_checksum, spool_dir=settings.s3_spool_dir,
                keep_bytes=settings.s3_spool_keep,
                connections=max(10, settings.transfer_slots + 8),
            ),
        )
        await s3.open()
        store = s3
    if isinstance(store, PartLimits) and settings.chunk_size < store.min_part_size:
        await close_blob_store(store)
        raise ValueError(
            f"MEMVAULT_CHUNK_SIZE is {settings.chunk_size} bytes; the {store.name} blob store "
            f"needs chunks of at least {store.min_part_size} bytes (every chunk but the last "
            "is one part)"
        )
    return store


async def close_blob_store(store: BlobStore) -> None:
    if isinstance(store, _Closable):
        await store.close()
