"""Request-scoped dependencies: the services built by ``create_app`` and the caller."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import structlog
from fastapi import Depends, Request

from memvault.admission import TransferSlots
from memvault.auth import AuthService, Principal
from memvault.capsules import CapsuleService
from memvault.errors import Forbidden
from memvault.jobs.queue import JobQueue
from memvault.jobs.runner import DerivativeRunner
from memvault.metadata import Database
from memvault.metrics import Metrics
from memvault.settings import Settings
from memvault.storage.base import BlobStore
from memvault.uploads import UploadService


@dataclass
class Services:
    auth: AuthService
    capsules: CapsuleService
    uploads: UploadService
    store: BlobStore
    slots: TransferSlots
    metrics: Metrics
    settings: Settings
    db: Database
    jobs: JobQueue
    runner: DerivativeRunner | None = None


def list_header(request: Request, name: str) -> str | None:
    """A list-valued header (``Content-Digest``, ``If-Match``, ...) as one value: a client may
    send it on several lines, which mean the same as one line joined by commas (RFC 9110
    §5.3); reading only the first line would skip what the others say."""
    lines = request.headers.getlist(name)
    return ", ".join(lines) if lines else None


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


async def caller(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    svc = services(request)
    principal = await svc.auth.authenticate(token.strip() if scheme.lower() == "bearer" else None)
    # Every log line of this request names the caller (the request runs in its own task, so
    # the binding ends with it).
    structlog.contextvars.bind_contextvars(caller=principal.id)
    return principal


async def admin(principal: Annotated[Principal, Depends(caller)]) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this endpoint is for administrators")
    return principal


Caller = Annotated[Principal, Depends(caller)]
Admin = Annotated[Principal, Depends(admin)]
Svc = Annotated[Services, Depends(services)]
