"""Plain values the session core takes and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from memvault.errors import NotFound

PENDING = "pending"
COMMITTED = "committed"
EXPIRED = "expired"
ABORTED = "aborted"


@dataclass(frozen=True)
class SessionSpec:
    """What a caller asks for at begin. ``owner`` and the scopes are opaque to the core."""

    owner: str
    idem_scope: str
    idem_key: str
    size: int
    chunk_size: int
    declared_sha256: str | None = None
    exclusive_key: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Session:
    id: str
    owner: str
    idem_scope: str
    """Where the idempotency key is unique (uploads use the capsule); logged as ``scope``."""
    state: str
    size: int
    chunk_size: int
    declared_sha256: str | None
    staging_key: str
    hashed_offset: int
    result_sha256: str | None
    attrs: dict[str, Any]
    created_at: float
    last_seen: float
    expires_at: float
    ended_at: float | None

    @property
    def chunk_count(self) -> int:
        # ceil(size / chunk_size); a zero-byte upload has no chunks at all.
        return -(-self.size // self.chunk_size)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index``; the last chunk holds the remainder."""
        start = index * self.chunk_size
        return start, min(self.chunk_size, self.size - start)


@dataclass(frozen=True)
class ChunkChecksums:
    """Digests a client may send with a chunk, checked against the bytes as they stream."""

    crc32c: int | None = None
    sha256: bytes | None = None


@dataclass(frozen=True)
class PutResult:
    session: Session
    index: int
    duplicate: bool
    received_count: int
    bytes_received: int


@dataclass(frozen=True)
class Pace:
    """The slowest a body may arrive: after ``grace`` seconds, at least ``min_rate`` bytes/s
    on average since it began (a stalled or trickling client, slowloris, loses its slot)."""

    min_rate: int
    grace: float

    def deadline(self, start: float, seen: int) -> float | None:
        """When the next bytes must have arrived, given ``seen`` bytes since ``start``."""
        if self.min_rate <= 0:
            return None
        return start + self.grace + seen / self.min_rate


@dataclass(frozen=True)
class SessionPolicy:
    """Timing and I/O choices of the session core (from Settings)."""

    ttl: float
    expired_grace: float
    chunk_timeout: float
    write_batch: int
    fsync: bool
    hash_lag: int = 32 * 1024 * 1024
    """How far behind a chunk's end the background hashing may be when the chunk is
    answered (``Frontier.keep_up``): what a finish may be left to hash."""
    claim_lease: float = 10.0
    claim_poll: float = 0.05
    pace: Pace = Pace(min_rate=0, grace=0.0)
    staging_loss_is_final: bool = False
    """A staging file missing for a pending session means its bytes are lost (the local
    folder holds the database too, so a folder not mounted would show no sessions at all)."""


def session_not_found(session_id: str) -> NotFound:
    """The answer for a session id with no row the caller owns. An aborted session's rows
    go at once (an expired one's after ``expired_grace``), so a request racing an abort,
    e.g. a finish, gets this: the detail says so rather than suggesting a wrong id."""
    return NotFound(f"upload session {session_id} not found: no such session of yours, or it "
                    "was aborted (an aborted session is removed at once) or ended long ago")
