"""Upload sessions: the generic resumable-transfer core (no HTTP, no capsules)."""

from memvault.sessions.model import ChunkChecksums, PutResult, Session, SessionSpec
from memvault.sessions.service import CommitHook, EndHook, FinishItem, SessionService
from memvault.sessions.streaming import Batch, Body, ChunkBody

__all__ = [
    "Batch",
    "Body",
    "ChunkBody",
    "ChunkChecksums",
    "CommitHook",
    "EndHook",
    "FinishItem",
    "PutResult",
    "Session",
    "SessionService",
    "SessionSpec",
]
