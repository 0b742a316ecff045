"""``AsyncClient``: the whole API, on ``httpx.AsyncClient``. ``Client`` wraps this same class."""

from __future__ import annotations

import asyncio
import enum
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self, TypeAlias
from urllib.parse import quote

import httpx

from memvault.client.download import download
from memvault.client.lanes import Derivatives, MemoryUpload
from memvault.client.models import (
    Capsule,
    Memory,
    MemoryPage,
    Session,
    SessionList,
    UploadResult,
)
from memvault.client.retry import RetryPolicy
from memvault.client.source import Source
from memvault.client.state import StateStore, default_state_dir
from memvault.client.transport import Transport
from memvault.client.upload import ChunkUpload, ProgressCallback, discard_recorded, record_key
from memvault.client.workers import DerivativeWorkers
from memvault.errors import Conflict, InvalidArgument, NotFound


class Unset(enum.Enum):
    """The type of ``UNSET``: "leave this field as it is" (``update_memory``'s default; a
    wrapper passing fields through annotates them ``str | Unset | None``)."""

    UNSET = enum.auto()


UNSET = Unset.UNSET

CapsuleRef: TypeAlias = Capsule | str
"""A capsule, or its id."""
MemoryRef: TypeAlias = Memory | str
"""A memory, or its id."""
PathOrStream: TypeAlias = str | os.PathLike[str] | BinaryIO
"""A file by path, or a binary stream (read from its current position to its end)."""


class AsyncClient:
    """A memvault server, as one caller (``token``) sees it.

    >>> async with AsyncClient("http://127.0.0.1:8080", token) as mv:  # doctest: +SKIP
    ...     family = await mv.capsule("family", create=True)
    ...     memory = await mv.upload_memory("IMG_0001.jpg", capsule=family)
    ...     await mv.download(memory, "display", "IMG_0001.display.jpg")

    ``retry`` bounds how transient failures are retried (``RetryPolicy``); ``timeout`` is
    httpx's (seconds, or an ``httpx.Timeout``); ``state_dir`` is where interrupted uploads are
    recorded so a later call resumes them (default: ``MEMVAULT_STATE_DIR``, else the user's
    state directory); ``derivative_workers`` / ``derivative_timeout`` size the worker
    processes that make derivatives for ``upload_memory``; ``transport`` replaces httpx's
    network transport (e.g. ``httpx.ASGITransport(app)`` in tests); ``max_connections``
    bounds the connections open to the server at once (uploads in flight share them).

    ``url`` must be ``http(s)://HOST[:PORT][/PATH]``; anything else (``127.0.0.1:8080``,
    ``ftp://...``, no host) is a ``ValueError`` here rather than a network error later.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        retry: RetryPolicy | None = None,
        timeout: float | httpx.Timeout = 120.0,
        state_dir: str | os.PathLike[str] | None = None,
        derivative_workers: int = 1,
        derivative_timeout: float = 120.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 32,
    ) -> None:
        if not isinstance(timeout, httpx.Timeout):
            timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self.api = Transport(url, token, retry=retry or RetryPolicy(), timeout=timeout,
                             transport=transport, max_connections=max_connections)
        self.state = StateStore(Path(state_dir) if state_dir else default_state_dir())
        self._pruned = False
        self.workers = DerivativeWorkers(workers=derivative_workers,
                                         timeout=derivative_timeout)

    @property
    def url(self) -> str:
        return self.api.url

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close connections and stop the derivative worker processes."""
        try:
            await self.workers.close()
        finally:
            await self.api.aclose()

    # -- capsules --------------------------------------------------------------------------

    async def list_capsules(self) -> list[Capsule]:
        """The caller's capsules, oldest first."""
        return await self.api.fetch(list[Capsule], "GET", "/v1/capsules")

    async def create_capsule(self, name: str) -> Capsule:
        """A new capsule; ``Conflict`` if the caller already has one of that name."""
        return await self.api.fetch(Capsule, "POST", "/v1/capsules", json={"name": name},
                                    idempotent=False)

    async def capsule(self, name: str, *, create: bool = False) -> Capsule:
        """The caller's capsule named ``name``; made if missing when ``create`` (else
        ``NotFound``)."""
        for c in await self.list_capsules():
            if c.name == name.strip():
                return c
        if not create:
            raise NotFound(f"capsule {name!r} not found", name=name)
        try:
            return await self.create_capsule(name)
        except Conflict:
            # Made meanwhile by someone else (or by a create whose answer was lost).
            return await self.capsule(name)

    # -- memories --------------------------------------------------------------------------

    async def create_memory(self, capsule: CapsuleRef, *, title: str | None = None,
                            taken_at: str | None = None,
                            metadata: dict[str, Any] | None = None) -> Memory:
        """An empty memory, to fill with ``upload_file(..., memory=...)``."""
        body = {"title": title, "taken_at": taken_at, "metadata": metadata}
        return await self.api.fetch(
            Memory, "POST", f"/v1/capsules/{_segment(_capsule_id(capsule))}/memories",
            json={k: v for k, v in body.items() if v is not None}, idempotent=False)

    async def get_memory(self, memory: MemoryRef) -> Memory:
        return await self.api.fetch(Memory, "GET",
                                    f"/v1/memories/{_segment(_memory_id(memory))}")

    async def list_memories(self, capsule: CapsuleRef, *, limit: int = 50,
                            cursor: str | None = None, sha256: str | None = None) -> MemoryPage:
        """One page, newest first; pass ``next_cursor`` back for the next one. ``sha256``
        asks for memories whose original has that digest (servers that do not filter
        return everything: use ``find_memories``, which checks)."""
        params: dict[str, str | int] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        if sha256 is not None:
            params["sha256"] = sha256.lower()
        return await self.api.fetch(
            MemoryPage, "GET", f"/v1/capsules/{_segment(_capsule_id(capsule))}/memories",
            params=params)

    async def iter_memories(self, capsule: CapsuleRef, *, page_size: int = 100,
                            sha256: str | None = None) -> AsyncIterator[Memory]:
        """Every memory of the capsule, newest first, a page at a time."""
        cursor: str | None = None
        while True:
            page = await self.list_memories(capsule, limit=page_size, cursor=cursor,
                                            sha256=sha256)
            for memory in page.items:
                yield memory
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def find_memories(self, capsule: CapsuleRef, sha256: str) -> list[Memory]:
        """Memories of the capsule whose original has this SHA-256 (the "already there?"
        check). Checked here as well, so a server that ignores the filter costs a full
        listing but never a wrong answer."""
        want = sha256.lower()
        return [m async for m in self.iter_memories(capsule, page_size=500, sha256=want)
                if "original" in m.assets and m.assets["original"].sha256 == want]

    async def update_memory(
        self,
        memory: MemoryRef,
        *,
        title: str | Unset | None = UNSET,
        taken_at: str | Unset | None = UNSET,
        metadata: dict[str, Any] | Unset | None = UNSET,
        thumbhash: str | Unset | None = UNSET,
    ) -> Memory:
        """Change the fields given (``None`` clears one); the others keep their values.
        ``metadata`` is replaced whole."""
        given = {"title": title, "taken_at": taken_at, "metadata": metadata,
                 "thumbhash": thumbhash}
        return await self.api.fetch(
            Memory, "PATCH", f"/v1/memories/{_segment(_memory_id(memory))}",
            json={k: v for k, v in given.items() if not isinstance(v, Unset)})

    # -- uploads ---------------------------------------------------------------------------

    async def upload_file(
        self,
        path_or_stream: PathOrStream,
        capsule: CapsuleRef,
        *,
        memory: MemoryRef | None = None,
        role: str = "original",
        parallel: int = 4,
        on_progress: ProgressCallback | None = None,
        filename: str | None = None,
        content_type: str | None = None,
        size: int | None = None,
        sha256: str | None = None,
    ) -> UploadResult:
        """Upload one file as the ``role`` asset of ``memory`` (default: a new memory).

        Resumable: an interrupted upload of the same path (same size, modification time and
        end blocks) continues where the server stopped, sending only the chunks it lacks.
        ``parallel`` chunks are in flight (and in memory) at once. ``sha256``, if known, is
        declared at begin and checked before finish. A stream that cannot seek needs
        ``size``. Returns the memory, the asset and what was sent.
        """
        await self.prune_state()
        source = Source(path_or_stream, filename=filename, size=size)
        try:
            upload = ChunkUpload(
                self.api, source, capsule_id=_capsule_id(capsule),
                memory_id=_memory_id(memory) if memory is not None else None, role=role,
                content_type=content_type, sha256=sha256, parallel=parallel,
                on_progress=on_progress, state=self.state)
            return await upload.run()
        finally:
            source.close()

    async def upload_memory(
        self,
        original: PathOrStream,
        *,
        capsule: CapsuleRef,
        derivatives: Derivatives = "auto",
        thumbhash: str | None = None,
        parallel: int = 4,
        on_progress: ProgressCallback | None = None,
        filename: str | None = None,
        content_type: str | None = None,
        size: int | None = None,
        sha256: str | None = None,
    ) -> Memory:
        """A new memory with its original and derivatives, uploaded in two lanes at once.

        ``derivatives``: ``"auto"`` makes display, thumb and placeholder from the original in
        a worker process (nothing for a non-image, or a stream: not an error), a mapping gives
        them (role → path or bytes, with ``thumbhash`` if you have one), ``None`` leaves them
        to the server. Raises ``UploadMemoryError`` with each failed lane's real error.
        Returns the memory with its assets.
        """
        await self.prune_state()
        source = Source(original, filename=filename, size=size)
        try:
            upload = MemoryUpload(
                self.api, self.workers, source, capsule_id=_capsule_id(capsule),
                derivatives=derivatives, thumbhash=thumbhash, parallel=parallel,
                on_progress=on_progress, state=self.state, content_type=content_type,
                sha256=sha256)
            return await upload.run()
        finally:
            source.close()

    async def prune_state(self) -> None:
        """Drop local resume records and remembered digests too old to matter
        (``StateStore.prune``), once per client; the first upload does it by itself, so
        the state folder does not grow."""
        if not self._pruned:
            self._pruned = True
            await asyncio.to_thread(self.state.prune)

    async def discard_upload(self, path: str | os.PathLike[str], capsule: CapsuleRef, *,
                             memory: MemoryRef | None = None, role: str = "original") -> bool:
        """Abort the unfinished upload of ``path`` that this client's state records (one an
        earlier ``upload_file``/``upload_memory`` call left, interrupted) and forget it, so it
        does not hold its place on the server until it expires. For a file found stored
        already, or no longer wanted. True if there was one."""
        resolved = await asyncio.to_thread(Path(path).resolve)
        key = record_key(self.api.url, _capsule_id(capsule),
                         _memory_id(memory) if memory is not None else None, role, resolved)
        return await discard_recorded(self.api, self.state, key)

    async def list_sessions(self) -> list[Session]:
        """The caller's pending upload sessions, with what each has received."""
        return (await self.api.fetch(SessionList, "GET", "/v1/uploads")).items

    async def admin_sessions(self) -> list[Session]:
        """Every principal's pending sessions (an admin token; else ``Forbidden``)."""
        return (await self.api.fetch(SessionList, "GET", "/v1/admin/sessions")).items

    async def get_session(self, session_id: str) -> Session:
        return await self.api.fetch(Session, "GET", f"/v1/uploads/{_segment(session_id)}")

    async def abort_session(self, session_id: str) -> None:
        """Abort a pending session; the server drops what it received, and this client
        forgets any resume record of it (``NotFound`` if there was no such session: the
        record goes too)."""
        try:
            await self.api.call("DELETE", f"/v1/uploads/{_segment(session_id)}")
        except NotFound:
            await asyncio.to_thread(self.state.drop_session, session_id)
            raise
        await asyncio.to_thread(self.state.drop_session, session_id)

    # -- downloads -------------------------------------------------------------------------

    async def download(
        self,
        memory: MemoryRef,
        role: str = "original",
        dest: str | os.PathLike[str] | BinaryIO = ".",
        *,
        on_progress: ProgressCallback | None = None,
    ) -> Path | None:
        """Write the ``role`` asset's bytes to ``dest`` (a file, a folder to put it in under
        its stored name, or a binary stream), verified against its SHA-256. An interrupted
        download to a path resumes from its ``.part`` file. Returns the file written."""
        m = memory if isinstance(memory, Memory) and role in memory.assets \
            else await self.get_memory(memory)
        asset = m.assets.get(role)
        if asset is None:
            raise NotFound(f"memory {m.id} has no {role!r} asset "
                           f"(it has: {', '.join(sorted(m.assets)) or 'none'})",
                           memory_id=m.id, role=role)
        target = Path(dest) if isinstance(dest, str | os.PathLike) else dest
        return await download(self.api, m, asset, target, on_progress)


def _capsule_id(capsule: CapsuleRef) -> str:
    return capsule.id if isinstance(capsule, Capsule) else capsule


def _memory_id(memory: MemoryRef) -> str:
    return memory.id if isinstance(memory, Memory) else memory


def _segment(given_id: str) -> str:
    """An id as one path segment: ``../admin/config`` or ``x?y`` given as an id is asked for
    as that id (and is ``not_found``), never as another path or query."""
    if not given_id:
        raise InvalidArgument("an id cannot be empty")
    return quote(given_id, safe="").replace(".", "%2E")  # no "." or ".." segment either
