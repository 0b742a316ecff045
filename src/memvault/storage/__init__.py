"""Blob storage: staging areas for upload sessions and immutable content-addressed blobs."""

from memvault.storage.base import BlobMissing, BlobStore, PartWriter, StagingGone

__all__ = ["BlobMissing", "BlobStore", "PartWriter", "StagingGone"]
