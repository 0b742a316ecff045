"""Metadata: the one truth about principals, capsules, memories, blobs and upload sessions."""

from memvault.metadata.database import Database, Work

__all__ = ["Database", "Work"]
