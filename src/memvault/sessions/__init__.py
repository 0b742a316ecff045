"""Upload sessions: the generic resumable-transfer core (no HTTP, no capsules)."""

from memvault.sessions.model import ChunkChecksums, PutResult, Session, SessionSpec
from memvault.sessions.service import CommitHook, EndHook, FinishItem, SessionService

__all__ = [
    "ChunkChecksums",
    "CommitHook",
    "EndHook",
    "FinishItem",
    "PutResult",
    "Session",
    "SessionService",
    "SessionSpec",
]
