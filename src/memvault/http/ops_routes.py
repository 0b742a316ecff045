"""Operations: liveness, readiness, metrics, and what administrators may see."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Response

from memvault.errors import Unavailable
from memvault.http.deps import Admin, Svc
from memvault.http.schemas import SessionList, session_out
from memvault.metadata.migrate import is_current

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive and serving HTTP."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(svc: Svc) -> dict[str, Any]:
    """Ready for traffic: metadata store reachable with a current schema, blob store reachable."""
    checks: dict[str, str] = {}
    try:
        checks["metadata"] = "ok" if await is_current(svc.db) else "schema out of date"
    except (sa.exc.SQLAlchemyError, OSError, Unavailable) as exc:  # readiness says what is wrong
        cause = exc.__cause__ if isinstance(exc, Unavailable) and exc.__cause__ else exc
        checks["metadata"] = f"unreachable: {cause.__class__.__name__}: {cause}"
    try:
        await svc.store.check()
        checks["blobs"] = "ok"
    except OSError as exc:
        checks["blobs"] = f"unreachable: {exc}"
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
