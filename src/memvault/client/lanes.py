"""``upload_memory``: the original and its derivatives in two concurrent lanes.

Lane A streams the original (``ChunkUpload``). Lane B, at the same time, has the display,
thumb and placeholder images made in a worker process (``derivatives="auto"``) or takes them
as given, and uploads each as an asset of the same memory. The memory is the one lane A's
begin makes: its id reaches lane B the moment begin answers, and a resumed lane A finds the
same session, so a resumed lane B finds the same memory (its begins are keyed by memory, role
and bytes, so they resume too).

Order is only imposed on the finishes, so that a memory never holds derivatives without its
original: lane A finishes once lane B has *sent* its derivatives (their sessions begun and
every byte received, not yet committed), and lane B finishes them once the original is
committed. The original's commit makes the server queue its own derivative job; the job
sees the roles lane B's pending sessions hold and waits for them instead of decoding, and
makes only what a session abandons. Everything else overlaps: lane B sends while lane A's
chunks are still going; lane A's finish waits only when lane B is slower (the decode of a
large image, usually).

Failures: if lane A fails, lane B is stopped and the sessions it has open are aborted first,
so the abort of lane A's session finds the memory it made empty and drops it; nothing is left
behind. If lane B fails, its open sessions are aborted and lane A still finishes, so the
original is safe (and the server then makes the derivatives). Either way
``UploadMemoryError`` carries each lane's own typed error with a note naming the lane: never
a bare "lane failed".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from memvault.client.errors import UploadMemoryError
from memvault.client.models import Memory, Session, SessionList, UploadResult
from memvault.client.source import Source, content_type
from memvault.client.state import StateStore
from memvault.client.transport import Transport
from memvault.client.upload import ChunkUpload, ProgressCallback, first_error
from memvault.client.workers import DerivativeWorkers
from memvault.derivatives import Unsupported
from memvault.errors import Conflict, MemvaultError, MethodNotAllowed

log = logging.getLogger("memvault.client")

DERIVED_ROLES = ("display", "thumb", "placeholder")
Derivatives = Literal["auto"] | Mapping[str, "str | os.PathLike[str] | bytes"] | None
"""``"auto"``: made from the original in a worker process (skipped, not an error, for what
is not an image, or for a stream); a mapping: role → path or bytes, as given; ``None``: none
from this client (the server makes them after the original is stored)."""

_EMPTY = "the {role} derivative is empty: give an image, or leave the role out"
_EXTENSIONS = {"image/jpeg": "jpg", "image/webp": "webp", "image/png": "png",
               "image/avif": "avif", "image/gif": "gif"}


@dataclass(frozen=True)
class Derived:
    role: str
    data: bytes
    content_type: str


class MemoryUpload:
    def __init__(
        self,
        api: Transport,
        workers: DerivativeWorkers,
        source: Source,
        *,
        capsule_id: str,
        derivatives: Derivatives,
        thumbhash: str | None,
        parallel: int,
        on_progress: ProgressCallback | None,
        state: StateStore | None,
        content_type: str | None,
        sha256: str | None,
    ) -> None:
        if derivatives is not None and derivatives != "auto":
            if not isinstance(derivatives, Mapping):
                raise ValueError('derivatives must be "auto", a mapping of role to '
                                 "path or bytes, or None")
            unknown = set(derivatives) - set(DERIVED_ROLES)
            if unknown:
                raise ValueError(f"unknown derivative roles {sorted(unknown)}; "
                                 f"use {', '.join(DERIVED_ROLES)}")
            for role, value in derivatives.items():
                if isinstance(value, bytes) and not value:
                    raise ValueError(_EMPTY.format(role=role))
        self.api = api
        self.workers = workers
        self.source = source
        self.capsule_id = capsule_id
        self.derivatives = derivatives
        self.thumbhash = thumbhash
        self.on_progress = on_progress
        self.original = ChunkUpload(
            api, source, capsule_id=capsule_id, role="original", content_type=content_type,
            sha256=sha256, parallel=parallel, on_progress=on_progress, state=state,
            before_discard=self._stop_lane_b)
        self._lane_b_task: asyncio.Task[None] | None = None
        self._lane_b_sent = asyncio.Event()  # lane B's bytes are all received, or it is over
        self._original_stored = asyncio.Event()
        self._stored: UploadResult | None = None
        self._together: list[ChunkUpload] = []
        """Lane B's uploads, all bytes sent: lane A finishes them in the original's commit."""
        self._patched = False
        self._memory: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.memory_id: str | None = None

    async def run(self) -> Memory:
        made = asyncio.create_task(self._produce(), name="derive")
        lane_b = asyncio.create_task(self._lane_b(made), name="lane B")
        self._lane_b_task = lane_b
        lane_a = asyncio.create_task(self._lane_a(lane_b), name="lane A")

        def stop_b(task: asyncio.Task[None]) -> None:
            if task.cancelled() or task.exception() is not None:
                _stop(lane_b)
                _stop(made)

        lane_a.add_done_callback(stop_b)
        tasks = (lane_a, lane_b, made)
        try:
            await asyncio.wait([lane_a, lane_b])
        finally:
            for task in tasks:
                _stop(task)
            await asyncio.gather(*tasks, return_exceptions=True)
        errors: list[Exception] = []
        a_error = lane_a.exception()
        if isinstance(a_error, Exception):
            a_error.add_note(f"in lane A: the original, {self.source.name}")
            errors.append(a_error)
        elif a_error is not None:
            raise a_error
        if not lane_b.cancelled():
            b_error = lane_b.exception()
            if isinstance(b_error, Exception):
                b_error.add_note(f"in lane B: the derivatives of {self.source.name}"
                                 + ("" if a_error else "; the original is stored and the "
                                    "server makes the derivatives itself"))
                errors.append(b_error)
            elif b_error is not None:
                raise b_error
        if errors:
            lanes = " and ".join(
                ("lane A (original)" if e is a_error else "lane B (derivatives)") + ": "
                + _describe(e) for e in errors)
            group = UploadMemoryError(f"upload of {self.source.name} failed in {lanes}", errors)
            group.memory_id = self.memory_id
            raise group
        assert self.memory_id is not None
        stored = self._stored
        if (stored is not None and not self._patched
                and all(u.role in stored.memory.assets for u in self._together)):
            return stored.memory  # read right after the commit that took every asset
        return await self.api.fetch(Memory, "GET", f"/v1/memories/{self.memory_id}")

    # -- lane A ----------------------------------------------------------------------------

    async def _stop_lane_b(self) -> None:
        """Lane A's session is about to be aborted: end lane B first (it aborts its own), so
        the abort of the session that made the memory finds it empty and drops it."""
        if self._lane_b_task is not None and not self._lane_b_task.done():
            _stop(self._lane_b_task)
            await asyncio.wait([self._lane_b_task])

    async def _lane_a(self, lane_b: asyncio.Task[None]) -> None:
        def opened(session: Session) -> None:
            self.memory_id = session.memory_id
            if not self._memory.done():
                self._memory.set_result(session.memory_id)

        async def after_lane_b_sent() -> None:
            await self._lane_b_sent.wait()  # lane B's outcome is reported by run(), not here

        self._stored = await self.original.run(
            opened=opened, before_finish=after_lane_b_sent, together=lambda: self._together)
        self._original_stored.set()

    # -- lane B ----------------------------------------------------------------------------

    async def _produce(self) -> tuple[list[Derived], str | None]:
        given = self.derivatives
        if given is None:
            return [], None
        if given == "auto":
            if self.source.path is None:
                return [], None  # a stream: the server derives from the stored original
            try:
                made = await self.workers.make(str(self.source.path))
            except Unsupported as exc:
                log.info("no derivatives for %s: %s (%s)", self.source.name, exc.reason,
                         exc.code)
                return [], None
            return [Derived(d.role, d.data, d.content_type)
                    for d in (made.display, made.thumb, made.placeholder)], made.thumbhash
        assert isinstance(given, Mapping)
        out = []
        for role, value in given.items():
            if isinstance(value, bytes):
                data, name = value, role
            else:
                data, name = await asyncio.to_thread(Path(value).read_bytes), str(value)
                if not data:
                    raise ValueError(_EMPTY.format(role=role) + f" ({name})")
            out.append(Derived(role, data, content_type(name, data[:64])))
        return out, self.thumbhash

    async def _lane_b(self, made_task: asyncio.Task[tuple[list[Derived], str | None]]) -> None:
        try:
            made, thumbhash = await made_task
            if not made and thumbhash is None:
                return
            memory_id = await self._memory
            present = await self._roles(memory_id) if self._may_hold_assets() else set()
            uploads = [self._derivative_upload(memory_id, d)
                       for d in made if d.role not in present]
            opened: list[ChunkUpload] = []
            try:
                await _all(self._send(u, opened) for u in uploads)
                self._together = list(opened)  # lane A tries to finish them with the original
                self._lane_b_sent.set()
                await self._original_stored.wait()
                await _all(self._finish(u, opened) for u in list(opened))
            except BaseException:
                # Stopped (the original will not be stored) or failed: end what is open, so
                # nothing is left pending (and the server's job makes those roles instead).
                await asyncio.shield(
                    asyncio.gather(*(u.abort() for u in opened), return_exceptions=True))
                raise
        finally:
            self._lane_b_sent.set()  # lane A never waits for a lane B that is over
        if thumbhash is not None:
            self._patched = True  # the memory changes after the commit: read it at the end
            try:
                await self.api.call("PATCH", f"/v1/memories/{memory_id}",
                                    json={"thumbhash": thumbhash})
            except MethodNotAllowed:
                log.info("server does not take a ThumbHash from clients (PATCH "
                         "/v1/memories/{id}); it computes its own when it derives")

    def _may_hold_assets(self) -> bool:
        """False when the memory is the one lane A's still pending session made: nothing can
        be committed to it before that session (this SDK commits derivatives with or after
        the original), so asking the server which roles it holds is a wasted request."""
        session = self.original.session
        return not (self.original.target_memory is None and session is not None
                    and session.state == "pending")

    def _derivative_upload(self, memory_id: str, d: Derived) -> ChunkUpload:
        stem = os.path.splitext(self.source.name)[0] or "memory"
        name = f"{stem}.{d.role}.{_EXTENSIONS.get(d.content_type, 'bin')}"
        key = StateStore.key("memvault-derivative-v1", memory_id, d.role,
                             hashlib.sha256(d.data).hexdigest())
        return ChunkUpload(
            self.api, Source(d.data, filename=name), capsule_id=self.capsule_id,
            memory_id=memory_id, role=d.role, content_type=d.content_type, parallel=1,
            on_progress=self.on_progress, idempotency_key=key)

    async def _send(self, upload: ChunkUpload, opened: list[ChunkUpload]) -> None:
        """One derivative: begin (or resume) and send; ``opened`` lists it until finished."""
        try:
            await upload.open()
        except Conflict as exc:
            if exc.extra.get("role") == upload.role:
                return  # the role was filled meanwhile (by the server's job): keep that one
            if "target" not in exc.extra:
                raise
            # A pending session for this role with other bytes (an earlier run of another
            # version of this SDK): it is ours, abort it and begin again.
            await self._abort_target(upload.target_memory, upload.role)
            await upload.open()
        opened.append(upload)
        await upload.transfer()

    async def _finish(self, upload: ChunkUpload, opened: list[ChunkUpload]) -> None:
        try:
            await upload.finish()
        except Conflict as exc:
            if exc.extra.get("role") != upload.role:
                raise
            await upload.abort()  # filled meanwhile by the server: keep the server's
        opened.remove(upload)

    async def _abort_target(self, memory_id: str | None, role: str) -> None:
        sessions = (await self.api.fetch(SessionList, "GET", "/v1/uploads")).items
        for s in sessions:
            if s.memory_id == memory_id and s.role == role:
                with contextlib.suppress(MemvaultError):
                    await self.api.call("DELETE", f"/v1/uploads/{s.id}")

    async def _roles(self, memory_id: str) -> set[str]:
        return set((await self.api.fetch(Memory, "GET", f"/v1/memories/{memory_id}")).assets)


def _stop(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` once: a second cancel would break a lane out of the shielded aborts
    it runs on its way out (Ctrl-C cancels ``run``, and lane A's end then stops lane B
    again), and the sessions it had open would be left pending."""
    if not task.done() and not task.cancelling():
        task.cancel()


async def _all(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run the coroutines concurrently; on failure raise the first real error (not a group)."""
    failure: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as tasks:
            for coro in coros:
                tasks.create_task(coro)
    except ExceptionGroup as group:
        failure = first_error(group)
    if failure is not None:
        raise failure


def _describe(error: BaseException) -> str:
    if isinstance(error, MemvaultError):
        return f"{error.code}: {error.detail}"
    return f"{type(error).__name__}: {error}"
