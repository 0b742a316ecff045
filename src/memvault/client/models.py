"""What the SDK returns: the server's JSON shapes as frozen, typed values.

Unknown fields are ignored, so a newer server's additions never break an older SDK.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Capsule(_Model):
    id: str
    name: str
    created_at: str | None = None


class Asset(_Model):
    """One stored blob of a memory, in a role (``original``, ``display``, ``thumb``,
    ``placeholder``); ``url`` is the path that reads its bytes."""

    role: str
    size: int
    sha256: str
    content_type: str
    filename: str | None = None
    created_at: str | None = None
    url: str


class Memory(_Model):
    """A memory with its assets; ``derivatives`` says per derived role ``ready``, ``pending``,
    ``failed``, ``unsupported`` or ``absent``."""

    id: str
    capsule_id: str
    title: str | None = None
    taken_at: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: str | None = None
    assets: dict[str, Asset] = Field(default_factory=dict)
    thumbhash: str | None = None
    derivatives: dict[str, str] = Field(default_factory=dict)
    derivatives_reason: str | None = None


class MemoryPage(_Model):
    items: list[Memory]
    next_cursor: str | None = None


class Session(_Model):
    """An upload session as the server sees it: what a client needs to resume."""

    id: str
    owner: str = ""
    state: str
    capsule_id: str
    memory_id: str
    role: str
    filename: str
    content_type: str
    size: int
    chunk_size: int
    chunk_count: int
    received: list[int] = Field(default_factory=list)
    received_count: int = 0
    bytes_received: int = 0
    created_at: str | None = None
    expires_at: str | None = None


class SessionList(_Model):
    """The answer of ``GET /v1/uploads`` and ``GET /v1/admin/sessions``."""

    items: list[Session]


class Finished(_Model):
    """A finish's answer for one session (older servers leave ``memory`` out)."""

    memory_id: str
    role: str
    memory: Memory | None = None


class FinishedList(_Model):
    """The answer of ``POST /v1/uploads/finish``."""

    items: list[Finished]


class UploadResult(_Model):
    """What ``upload_file`` did: the memory and asset, and how much this call sent.

    ``chunks_skipped`` counts chunks the server already held (a resumed upload).
    """

    memory: Memory
    asset: Asset
    session_id: str
    chunks_sent: int
    chunks_skipped: int
    bytes_sent: int

    @property
    def resumed(self) -> bool:
        return self.chunks_skipped > 0


Phase = Literal["begin", "transfer", "finish", "done"]


@dataclass(frozen=True)
class Progress:
    """One step of one upload, for ``on_progress`` callbacks.

    ``bytes_done`` counts bytes the server holds (including what it had before a resume);
    ``bytes_sent`` only what this call sent. Callbacks run on the event loop of the upload
    (for the sync ``Client``: its background thread) and must return quickly.
    """

    filename: str
    role: str
    phase: Phase
    bytes_done: int
    total: int
    bytes_sent: int
    chunks_done: int
    chunk_count: int
