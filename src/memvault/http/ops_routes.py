"""Operations: liveness, readiness, metrics, and what administrators may see."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Request, Response

from memvault.errors import InsufficientStorage, Unavailable
from memvault.http.deps import Admin, Svc
from memvault.http.schemas import SessionList, session_out
from memvault.metadata.migrate import is_current, probe_write
from memvault.storage.base import WriteProbe

router = APIRouter(tags=["ops"])

PROBE_TTL = 1.0
"""Seconds a write probe's outcome answers readiness polls (load balancers poll several
times a second, from several places): at most one probe file and one committed write per
second, whatever the polling."""


class WriteProbes:
    """The last outcome of each write probe, shared by the polls within ``PROBE_TTL``;
    polls that arrive while one runs wait for it instead of starting their own."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._seen: dict[str, tuple[float, str]] = {}

    async def outcome(self, name: str, probe: Callable[[], Awaitable[None]]) -> str:
        async with self._locks.setdefault(name, asyncio.Lock()):
            seen = self._seen.get(name)
            if seen is not None and time.monotonic() - seen[0] < PROBE_TTL:
                return seen[1]
            try:
                await probe()
                result = "ok"
            except (sa.exc.SQLAlchemyError, OSError, Unavailable, InsufficientStorage) as exc:
                result = f"not writable: {_cause(exc)}"
            self._seen[name] = (time.monotonic(), result)
            return result


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, Unavailable | InsufficientStorage) \
        and exc.__cause__ else exc
    if isinstance(cause, sa.exc.DBAPIError) and cause.orig is not None:
        cause = cause.orig  # the driver's own words, without SQLAlchemy's statement dump
    lines = str(cause).splitlines()
    text = lines[0] if lines else ""
    return f"{cause.__class__.__name__}: {text}" if text else cause.__class__.__name__


def _probes(request: Request) -> WriteProbes:
    probes = getattr(request.app.state, "write_probes", None)
    if probes is None:
        probes = request.app.state.write_probes = WriteProbes()
    assert isinstance(probes, WriteProbes)
    return probes


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive and serving HTTP."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(svc: Svc, request: Request) -> dict[str, Any]:
    """Ready for traffic: metadata store reachable with a current schema and taking writes,
    blob store reachable and (local folder) taking writes.

    Looking is not enough: a full volume, one the kernel remounted read-only after an error,
    or a database file opened read-only all pass a look while every upload fails. So each
    poll also has a write made (a small file synced and removed in staging/; the schema's
    version row set to itself, committed), at most once per ``PROBE_TTL`` seconds: the
    outcome of the last one answers the polls in between. What only needs a look (the
    database reachable, the folders there) is looked at on every poll.
    """
    probes = _probes(request)
    checks: dict[str, str] = {}
    try:
        checks["metadata"] = "ok" if await is_current(svc.db) else "schema out of date"
    except (sa.exc.SQLAlchemyError, OSError, Unavailable) as exc:  # readiness says what is wrong
        checks["metadata"] = f"unreachable: {_cause(exc)}"
    if checks["metadata"] == "ok":
        checks["metadata"] = await probes.outcome("metadata", lambda: probe_write(svc.db))
    try:
        await svc.store.check()
        checks["blobs"] = "ok"
    except OSError as exc:
        checks["blobs"] = f"unreachable: {exc}"
    store = svc.store
    if checks["blobs"] == "ok" and isinstance(store, WriteProbe):
        checks["blobs"] = await probes.outcome("blobs", store.probe_write)
    failing = {k: v for k, v in checks.items() if v != "ok"}
    if failing:
        raise Unavailable("not ready: " + "; ".join(f"{k} {v}" for k, v in failing.items()),
                          retry_after=5, checks=checks)
    return {"status": "ready", "checks": checks}


@router.get("/metrics", response_class=Response)
async def metrics(svc: Svc) -> Response:
    """Prometheus text format."""
    now = svc.uploads.clock.now()
    body = await svc.metrics.render(svc.db, svc.slots, day_start=now - now % 86400)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/admin/config")
async def admin_config(_: Admin, svc: Svc) -> dict[str, Any]:
    """The settings in force in this process (the same values the start-up log shows)."""
    return svc.settings.effective()


@router.get("/v1/admin/sessions", response_model=SessionList)
async def admin_sessions(_: Admin, svc: Svc) -> SessionList:
    """Every live (pending) upload session, of every principal, oldest first."""
    items = []
    for s in await svc.uploads.sessions.list_pending(None):
        received, total = await svc.uploads.sessions.received(s)
        items.append(session_out(s, received, total))
    return SessionList(items=items)
