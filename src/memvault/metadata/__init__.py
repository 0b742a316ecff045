"""Metadata: the one truth about principals, capsules, memories, blobs and upload sessions."""

from memvault.metadata.database import Database, UnitOfWork

__all__ = ["Database", "UnitOfWork"]
