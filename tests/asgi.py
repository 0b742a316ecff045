"""The real app in-process for SDK tests: ``httpx.ASGITransport``, no sockets, no processes.

The app's lifespan (database, migrations, admin token) runs around the test; derivative
workers are off unless asked for (the server-side job runner is tested elsewhere).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from memvault.client import AsyncClient, RetryPolicy
from memvault.http.app import create_app
from memvault.settings import Settings
from tests.faults import FaultTransport, Rule

KiB = 1024
CHUNK = 64 * KiB

FAST_RETRIES = RetryPolicy(attempts=4, max_wait=5.0, base_delay=0.01, max_delay=0.05)
"""Retries that do not slow a test down (the server's Retry-After is still honoured)."""


@dataclass
class InApp:
    url: str
    token: str
    transport: httpx.ASGITransport
    root: Path
    settings: Settings

    def client(self, token: str | None = None, *, rule: Rule | None = None,
               **options: Any) -> AsyncClient:
        """An SDK client on the app; with ``rule``, its requests pass a ``FaultTransport``
        (``faults(client).log`` tells what was injected and what reached the app)."""
        options.setdefault("retry", FAST_RETRIES)
        options.setdefault("state_dir", self.root / "client-state")
        transport: httpx.AsyncBaseTransport = FaultTransport(self.transport, rule)
        return AsyncClient(self.url, token or self.token, transport=transport, **options)

    def raw(self, token: str | None = None) -> httpx.AsyncClient:
        """A plain httpx client on the same app (to look behind the SDK's back)."""
        return httpx.AsyncClient(transport=self.transport, base_url=self.url,
                                 headers={"Authorization": f"Bearer {token or self.token}"})


def _scratch() -> Path:
    """A fresh folder, on tmpfs when there is one (fsync-heavy code runs much faster)."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="memvault-sdk-", dir=shm if shm.is_dir() else None))


@contextlib.asynccontextmanager
async def in_app(**overrides: Any) -> AsyncIterator[InApp]:
    root = _scratch()
    try:
        values: dict[str, Any] = {"chunk_size": CHUNK, "min_chunk_size": KiB,
                                  "storage_reserve": 0, "derivative_workers": 0,
                                  "log_format": "json", "log_level": "warning",
                                  **overrides}
        settings = Settings(data_dir=root / "data", **values)
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            token = (root / "data" / "admin.token").read_text().strip()
            yield InApp("http://memvault.test", token, httpx.ASGITransport(app=app), root,
                        settings)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def faults(client: AsyncClient) -> FaultTransport:
    """The fault transport under a client made by ``InApp.client``."""
    transport = client.api.http._transport
    assert isinstance(transport, FaultTransport)
    return transport
