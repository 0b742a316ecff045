"""One settings schema for every environment (DESIGN §3.7).

Values come from, in order: keyword arguments (the CLI's flags), ``MEMVAULT_*`` environment
variables, then the defaults below. Embedded and scale-out deployments use the same schema;
they differ only in the values, and ``effective()`` is logged at start-up.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

if TYPE_CHECKING:
    from memvault.derivatives.model import DerivativeOptions

MiB = 1024 * 1024
GiB = 1024 * MiB


class Settings(BaseSettings):
    """Every tunable of the service. Read ``README.md#configuration`` for the meaning of each."""

    model_config = SettingsConfigDict(env_prefix="MEMVAULT_", extra="forbid")

    data_dir: Path = Path("data")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy async URL; default: SQLite file in data_dir",
    )
    listen_database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL for the frontier hand-off's LISTEN connection, when "
        "database_url goes through a pooler in transaction mode; default: database_url",
    )
    auto_migrate: bool | None = Field(
        default=None,
        description="apply migrations at start; default: on for SQLite, off otherwise",
    )

    blob_store: str | None = Field(
        default=None,
        description="where blobs live: s3://bucket/prefix for an S3-compatible object store; "
        "default: blobs/ and staging/ in data_dir",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3 endpoint for stores other than AWS (MinIO, Ceph RGW, ...)"
    )
    s3_region: str | None = Field(default=None, description="S3 region (default: AWS chain's)")
    s3_checksum: bool = Field(
        default=True, description="send a CRC32C with every part (off for stores without it)"
    )
    s3_spool_dir: Path | None = Field(
        default=None,
        description="local folder where parts are spooled on their way to S3 "
        "(default: the system's temporary folder)",
    )
    s3_spool_keep: int = Field(
        default=256 * MiB, ge=0,
        description="bytes of uploaded parts kept on local disk for hashing them when the "
        "gap before them fills",
    )
    frontier_handoff_wait: float = Field(
        default=2.0,
        ge=0,
        description="seconds a finish waits, per step, for other processes to hash the parts "
        "they hold before reading those back from the object store (PostgreSQL + S3)",
    )

    chunk_size: int = Field(default=8 * MiB, ge=1,
                            description="chunk size the server answers at begin")
    min_chunk_size: int = Field(default=64 * 1024, ge=1)
    max_chunk_size: int = Field(default=64 * MiB, ge=1)
    max_upload_size: int = Field(default=1024 * GiB, ge=0,
                                 description="largest declared size accepted")
    max_chunk_count: int = Field(default=100_000, ge=1)
    max_pending_per_capsule: int = Field(
        default=32, ge=1, description="pending sessions per (caller, capsule)"
    )
    storage_reserve: int = Field(
        default=256 * MiB, ge=0, description="free bytes begin keeps in hand on the data volume"
    )

    transfer_slots: int = Field(
        default_factory=lambda: _default_transfer_slots(), ge=1,
        description="chunk transfers in flight in this process (default from cores and memory)",
    )
    transfer_slots_per_principal: int | None = Field(
        default=None, ge=1,
        description="chunk transfers in flight per caller in this process "
        "(default: a quarter of transfer_slots, at least 4)",
    )
    daily_upload_quota: int | None = Field(
        default=None, ge=0,
        description="bytes a principal may begin uploading per UTC day (none: no limit)",
    )
    storage_quota: int | None = Field(
        default=None, ge=0, description="bytes stored in one owner's capsules (none: no limit)"
    )
    header_timeout: float = Field(
        default=30.0, gt=0,
        description="seconds a request's head (and any body but a chunk's) may take to arrive"
    )
    max_json_bytes: int = Field(
        default=64 * 1024, ge=1024,
        description="largest JSON request body (all requests but chunks)",
    )
    min_transfer_rate: int = Field(
        default=16 * 1024, ge=0,
        description="slowest average bytes/s a chunk body may arrive at, after the grace period",
    )
    transfer_grace: float = Field(
        default=10.0, ge=0, description="seconds a chunk body may take before its rate is enforced"
    )

    derivative_workers: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=0,
        description="decoder processes for server-side derivatives (0: this process makes none)",
    )
    derivative_timeout: float = Field(
        default=60.0, gt=0, description="longest one derivative job may decode, seconds"
    )
    derivative_memory_limit: int = Field(
        default=2 * GiB, ge=0, description="address space of each decoder process (0: no limit)"
    )
    derivative_attempts: int = Field(default=3, ge=1,
                                     description="tries before a job is failed")
    derivative_max_pixels: int = Field(
        default=100_000_000, ge=1,
        description="largest width x height decoded (from the header, before decoding)",
    )
    display_width: int = Field(default=1920, description="display derivative fits this width")
    display_height: int = Field(default=1080, description="display derivative fits this height")
    display_format: Literal["JPEG", "WEBP"] = Field(
        default="JPEG", description="display format (WebP anyway for images with transparency)"
    )
    display_quality: int = Field(default=80, description="display encoder quality, 1..100")
    thumb_size: int = Field(default=300, description="thumb fits a square of this many px")
    thumb_quality: int = Field(default=80, description="thumb (WebP) quality, 1..100")
    derivative_lease: float = Field(
        default=60.0, gt=0, description="seconds a job stays claimed without its worker renewing"
    )

    session_ttl: float = Field(default=24 * 3600.0, gt=0,
                              description="idle seconds before expiry")
    expired_grace: float = Field(
        default=24 * 3600.0, ge=0, description="seconds an expired session answers 410 before 404"
    )
    reaper_interval: float = Field(default=60.0, gt=0)
    chunk_timeout: float = Field(
        default=600.0, gt=0, description="longest a single chunk transfer may take, seconds"
    )

    claim_lease: float = Field(
        default=10.0, gt=0,
        description="seconds a chunk transfer's claim lives without renewal (a dead "
        "process's claim, or one whose body stopped arriving, is taken over after this)",
    )
    write_batch: int = Field(
        default=2 * MiB, ge=4096,
        description="bytes per storage write (the size of the buffers chunk bodies are read into)"
    )
    fsync: bool = Field(default=True, description="fsync each chunk before acknowledging it")
    hash_lag: int = Field(
        default=32 * MiB, ge=0,
        description="bytes the background SHA-256 may lag behind a chunk when the chunk is "
        "answered; a chunk arriving faster waits, so a finish never has more to hash",
    )

    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def derivative_options(self) -> DerivativeOptions:
        """What the server's derivative jobs make (the SDK's lane B has its own)."""
        from memvault.derivatives.model import DerivativeOptions  # Pillow: not for every import

        return DerivativeOptions(
            display_box=(self.display_width, self.display_height),
            display_format=self.display_format, display_quality=self.display_quality,
            thumb_box=(self.thumb_size, self.thumb_size), thumb_quality=self.thumb_quality,
            max_pixels=self.derivative_max_pixels,
        )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not self.min_chunk_size <= self.chunk_size <= self.max_chunk_size:
            raise ValueError(
                f"MEMVAULT_CHUNK_SIZE {self.chunk_size} must lie in [MEMVAULT_MIN_CHUNK_SIZE "
                f"{self.min_chunk_size}, MEMVAULT_MAX_CHUNK_SIZE {self.max_chunk_size}]"
            )
        self.derivative_options()  # its own checks: boxes, qualities
        if self.blob_store and not (self.blob_store.startswith("s3://")
                                    and self.blob_store[len("s3://"):].partition("/")[0]):
            raise ValueError("MEMVAULT_BLOB_STORE must be an s3://bucket/prefix URL: "
                             f"{self.blob_store!r}")
        return self

    @property
    def s3_location(self) -> str | None:
        """The ``s3://`` URL blobs go to, or None for the data folder."""
        return self.blob_store or None

    @property
    def slots_per_principal(self) -> int:
        if self.transfer_slots_per_principal is not None:
            return min(self.transfer_slots_per_principal, self.transfer_slots)
        return min(self.transfer_slots, max(4, self.transfer_slots // 4))

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'memvault.db').resolve()}"

    @property
    def is_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")

    @property
    def database_in_data_dir(self) -> bool:
        """An SQLite file directly in the data folder (the embedded default)."""
        url = make_url(self.resolved_database_url)
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return False
        return self.sqlite_file.parent == self.data_dir.resolve()

    @property
    def sqlite_file(self) -> Path:
        """The SQLite database file the URL names (meaningful for SQLite only)."""
        return Path(make_url(self.resolved_database_url).database or "").resolve()

    @property
    def migrate_on_start(self) -> bool:
        return self.is_sqlite if self.auto_migrate is None else self.auto_migrate

    def effective(self) -> dict[str, Any]:
        """The values in force, for the start-up log (no secrets live in settings)."""
        values = self.model_dump(mode="json")
        values["database_url"] = redact(self.resolved_database_url)
        if self.listen_database_url:
            values["listen_database_url"] = redact(self.listen_database_url)
        values["transfer_slots_per_principal"] = self.slots_per_principal
        return values


TRANSFER_MEMORY = 8 * MiB
"""Memory set aside per transfer slot: its write batch (2 MiB by default, in one buffer or two
halves) is a quarter of it, so the slots' batches never take more than a quarter of memory."""

_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _default_transfer_slots(memory: int | None = None) -> int:
    """32 transfers per core, at most 256, fewer where memory is small."""
    cores = os.cpu_count() or 1
    usable = _usable_memory() if memory is None else memory
    return max(4, min(32 * cores, 256, usable // TRANSFER_MEMORY))


def _usable_memory(limits: Sequence[str | Path] = _CGROUP_LIMITS) -> int:
    """Physical memory, or the container's limit where that is lower (cgroup v2 or v1)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 1024 * MiB
    for path in limits:
        try:
            limit = Path(path).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if limit.isdigit():  # "max" (v2) or a huge number (v1) when there is no limit
            memory = min(memory, int(limit))
    return memory


def redact(url: str) -> str:
    """``url`` with its password (in the user part or the query) shown as ``***``."""
    try:
        parsed = make_url(url)
    except ArgumentError:  # not a database URL: shown only if it cannot carry a password
        return url if "@" not in url and "password" not in url.lower() else "<redacted>"
    query = {k: ("***" if "password" in k.lower() else v) for k, v in parsed.query.items()}
    return (parsed.set(query=query).render_as_string(hide_password=True)
            .replace("%2A%2A%2A", "***"))
