"""One settings schema for every environment (DESIGN §3.7).

Values come from, in order: keyword arguments (the CLI's flags), ``MEMVAULT_*`` environment
variables, then the defaults below. Embedded and scale-out deployments use the same schema;
they differ only in the values, and ``effective()`` is logged at start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
GiB = 1024 * MiB


class Settings(BaseSettings):
    """Every tunable of the service. Read ``README.md#configuration`` for the meaning of each."""

    model_config = SettingsConfigDict(env_prefix="MEMVAULT_", extra="forbid")

    data_dir: Path = Path("data")
    host: str = "127.0.0.1"
    port: int = 8080
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy async URL; default: SQLite file in data_dir",
    )
    auto_migrate: bool | None = Field(
        default=None,
        description="apply migrations at start; default: on for SQLite, off otherwise",
    )

    chunk_size: int = Field(default=8 * MiB, description="chunk size the server answers at begin")
    min_chunk_size: int = 64 * 1024
    max_chunk_size: int = 64 * MiB
    max_upload_size: int = Field(default=1024 * GiB, description="largest declared size accepted")
    max_chunk_count: int = 100_000
    max_pending_per_capsule: int = Field(
        default=32, description="pending sessions per (caller, capsule)"
    )
    storage_reserve: int = Field(
        default=256 * MiB, description="free bytes begin keeps in hand on the data volume"
    )

    session_ttl: float = Field(default=24 * 3600.0, description="idle seconds before expiry")
    expired_grace: float = Field(
        default=24 * 3600.0, description="seconds an expired session answers 410 before 404"
    )
    reaper_interval: float = 60.0
    chunk_timeout: float = Field(
        default=600.0, description="longest a single chunk transfer may take, seconds"
    )

    claim_lease: float = Field(
        default=10.0,
        description="seconds a chunk transfer's claim lives without renewal (a dead "
        "process's claim is taken over after this)",
    )
    write_batch: int = Field(
        default=512 * 1024, description="bytes gathered from the socket per storage write"
    )
    fsync: bool = Field(default=True, description="fsync each chunk before acknowledging it")

    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not self.min_chunk_size <= self.chunk_size <= self.max_chunk_size:
            raise ValueError(
                f"chunk_size {self.chunk_size} must lie in "
                f"[{self.min_chunk_size}, {self.max_chunk_size}]"
            )
        if self.session_ttl <= 0 or self.chunk_timeout <= 0:
            raise ValueError("session_ttl and chunk_timeout must be positive")
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'memvault.db').resolve()}"

    @property
    def is_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")

    @property
    def migrate_on_start(self) -> bool:
        return self.is_sqlite if self.auto_migrate is None else self.auto_migrate

    def effective(self) -> dict[str, Any]:
        """The values in force, for the start-up log (no secrets live in settings)."""
        values = self.model_dump(mode="json")
        values["database_url"] = _redact(self.resolved_database_url)
        return values


def _redact(url: str) -> str:
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
