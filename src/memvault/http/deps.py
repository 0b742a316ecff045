"""Request-scoped dependencies: the services built by ``create_app`` and the caller."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from memvault.auth import AuthService, Principal
from memvault.capsules import CapsuleService
from memvault.storage.base import BlobStore
from memvault.uploads import UploadService


@dataclass
class Services:
    auth: AuthService
    capsules: CapsuleService
    uploads: UploadService
    store: BlobStore


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


async def caller(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    svc = services(request)
    return await svc.auth.authenticate(token.strip() if scheme.lower() == "bearer" else None)


Caller = Annotated[Principal, Depends(caller)]
Svc = Annotated[Services, Depends(services)]
