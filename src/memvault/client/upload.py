"""One file's resumable upload: begin (or resume) → chunks in parallel → finish.

The steps are separate methods so ``upload_memory`` can hold lane A's finish until lane B's
derivatives are attached; ``run`` does them in order for ``upload_file``.

* **Begin or resume.** A path's upload is recorded locally (``state.StateStore``) under a key
  made of server, capsule, memory, role and path, with the file's fingerprint; the
  idempotency key sent with begin is derived from the fingerprint, the file's path (a
  stream's name) and the target, so a begin retried after a lost answer (or by a process
  that lost its record) finds the same pending session. A recorded session is asked what it
  holds (``GET /v1/uploads/{id}``); a record of another version of the file has its session
  aborted.
* **Chunks.** The file is read once, in order, one chunk at a time, off the event loop; each
  chunk, unless the server already holds it, is sent with a ``Content-Digest: crc32c`` as
  soon as it is read, and is hashed into the whole-file SHA-256 while it is on its way and
  before the next chunk is read. At most
  ``parallel`` chunks are in flight and one more is being read, whatever the file's size;
  they complete in any order.
  Chunks the server holds are still read and hashed (the digest covers the whole file), but
  not sent.
* **Finish** sends size and SHA-256; ``incomplete`` (the server lost a chunk it had
  acknowledged, e.g. after a power cut) re-sends the missing chunks and finishes again.

A session that can never finish (the file changed: ``conflict`` on a chunk,
``checksum_mismatch`` at finish, ``FileChanged``) is aborted and its record dropped. Anything
else (cancellation, Ctrl-C, the network gone for longer than the retry budget) keeps both,
so the next call resumes. A session that expired or vanished is begun afresh, once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import crc32c

from memvault.client.errors import BadResponse, FileChanged
from memvault.client.models import (
    Finished,
    FinishedList,
    Memory,
    Phase,
    Progress,
    Session,
    UploadResult,
)
from memvault.client.source import Source, content_type, random_key
from memvault.client.state import StateStore, UploadRecord
from memvault.client.transport import Transport, parse
from memvault.errors import (
    ChecksumMismatch,
    Conflict,
    Expired,
    Incomplete,
    LengthMismatch,
    MemvaultError,
    NotFound,
)

ProgressCallback = Callable[[Progress], None]

log = logging.getLogger("memvault.client")


class _SessionLost(Exception):
    """The session expired or vanished under us; ``run`` begins a new one once."""

    def __init__(self, error: MemvaultError) -> None:
        super().__init__(str(error))
        self.error = error


def record_key(server: str, capsule_id: str, memory_id: str | None, role: str,
               path: Path | None, *, filename: str | None = None,
               content_type: str | None = None) -> str:
    """Where a path's unfinished upload is recorded (``StateStore``). A ``filename`` or
    ``content_type`` given for it makes another upload, recorded apart: resuming one with
    the other's name would store it under the wrong name."""
    parts = [server, capsule_id, memory_id, role, str(path)]
    if (path is not None and filename not in (None, path.name)) or content_type is not None:
        parts += [filename or "", content_type or ""]
    return StateStore.key(*parts)


async def abort_quietly(api: Transport, session_id: str) -> None:
    """Abort a session; one that is gone already is no error."""
    with contextlib.suppress(NotFound, Expired):
        await api.call("DELETE", f"/v1/uploads/{session_id}")


async def discard_recorded(api: Transport, state: StateStore, key: str) -> bool:
    """Abort the recorded unfinished upload under ``key`` and forget it; False if none."""
    record = state.load_upload(key)
    if record is None:
        return False
    await abort_quietly(api, record.session_id)
    state.drop_upload(key)
    return True


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real failure in a task group's error, noting how many others there were."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        elif not isinstance(exc, asyncio.CancelledError):
            leaves.append(exc)

    walk(group)
    if not leaves:
        return asyncio.CancelledError()
    first = leaves[0]
    if len(leaves) > 1:
        others = ", ".join(getattr(e, "code", type(e).__name__) for e in leaves[1:])
        first.add_note(f"{len(leaves) - 1} concurrent request(s) failed too: {others}")
    return first


class ChunkUpload:
    def __init__(
        self,
        api: Transport,
        source: Source,
        *,
        capsule_id: str,
        memory_id: str | None = None,
        role: str = "original",
        content_type: str | None = None,
        sha256: str | None = None,
        parallel: int = 4,
        on_progress: ProgressCallback | None = None,
        state: StateStore | None = None,
        idempotency_key: str | None = None,
        before_discard: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        self.api = api
        self.source = source
        self.capsule_id = capsule_id
        self.target_memory = memory_id
        """The memory asked for (None: begin makes one)."""
        self.memory_id = memory_id
        """The memory being filled, once open() knows it."""
        self.role = role
        self.content_type = content_type
        self.declared_sha256 = sha256.lower() if sha256 else None
        self.parallel = parallel
        self.on_progress = on_progress
        # Only a file on disk can be found again by a later call: only it gets a record.
        self.state = state if source.path is not None else None
        self.record_key = record_key(api.url, capsule_id, memory_id, role, source.path,
                                     filename=source.name, content_type=content_type)
        self.fingerprint = ""
        self.idempotency_key = idempotency_key or ""
        self.before_discard = before_discard
        self.committed_meanwhile = False
        """Another run of the same upload (same file, same idempotency key, so the same
        session) finished the session while this one was sending: nothing more is sent,
        and ``finish`` gets that commit back (a replay, when the digest is the same)."""
        """Runs before a session that can never finish is aborted (lane B ends first)."""
        self.session: Session | None = None
        self.sha256: str | None = None
        self.result: UploadResult | None = None
        """Set once finished (by its own finish, or by another upload's, together)."""
        self.chunks_sent = 0
        self.chunks_skipped = 0
        self.bytes_sent = 0
        self.bytes_done = 0

    # -- the whole upload ------------------------------------------------------------------

    async def run(
        self,
        *,
        opened: Callable[[Session], None] | None = None,
        before_finish: Callable[[], Awaitable[None]] | None = None,
        together: Callable[[], Sequence[ChunkUpload]] | None = None,
    ) -> UploadResult:
        """open → transfer → finish. ``opened`` learns the session (and so the memory) as
        soon as it is known; ``before_finish`` runs between the last chunk and finish;
        ``together`` then names the uploads to try to finish in the same commit.

        A session that expired or vanished meanwhile is begun afresh once, unless someone
        was told its memory (``opened``): then the error is raised.
        """
        for attempt in (1, 2):
            try:
                session = await self.open()
                if opened is not None:
                    opened(session)
                await self.transfer()
                if before_finish is not None:
                    await before_finish()
                return await self.finish(together() if together is not None else ())
            except _SessionLost as lost:
                if attempt == 2 or opened is not None or not self.source.seekable:
                    raise lost.error from None
                self.forget()
        raise AssertionError("unreachable")

    # -- steps -----------------------------------------------------------------------------

    async def _identify(self) -> None:
        """Fingerprint, idempotency key and media type (reads the file's two end blocks)."""
        if self.fingerprint:
            return
        fingerprint, head = await asyncio.to_thread(
            lambda: (self.source.fingerprint(), self.source.head()))
        self.fingerprint = fingerprint.digest() if fingerprint is not None else random_key()
        # The server compares a repeated key's request with the pending session's (file
        # name included), so identical copies under two names must not share a key; nor
        # may two files of one name in two folders, whose fingerprints can match (same size,
        # time and end blocks) while their middles differ: the second would take over the
        # first's session and its chunks.
        self.idempotency_key = self.idempotency_key or StateStore.key(
            "memvault-upload-v4", self.capsule_id, self.target_memory, self.role,
            str(self.source.path), self.source.name, self.content_type, self.fingerprint)
        self.content_type = self.content_type or content_type(self.source.name, head)

    async def open(self) -> Session:
        """Resume the recorded session, or begin one (idempotently)."""
        self.session = None
        await self._identify()
        record = self.state.load_upload(self.record_key) if self.state else None
        if record is not None and self.state is not None:
            if record.fingerprint != self.fingerprint:
                await self._abort_quietly(record.session_id)
                self.state.drop_upload(self.record_key)
            else:
                found = await self._status(record.session_id)
                if found is not None and found.state in ("pending", "committed"):
                    self.session = found
                else:
                    self.state.drop_upload(self.record_key)
        if self.session is None:
            self.session = await self._begin()
            self._record()
        s = self.session
        self.memory_id = s.memory_id
        held = set(s.received) if s.state == "pending" else set(range(s.chunk_count))
        self.chunks_skipped = len(held)
        self.bytes_done = sum(self._length(i) for i in held)
        self._report("begin")
        return s

    async def transfer(self) -> None:
        """Read and hash every chunk in order; send those the server lacks, ``parallel`` at
        a time."""
        s = self._session()
        held = set(s.received) if s.state == "pending" else set(range(s.chunk_count))
        hasher = hashlib.sha256()
        slots = asyncio.Semaphore(self.parallel)

        async def send(index: int, data: bytes, crc: int) -> None:
            try:
                sent = await self._put(index, data, crc)
            finally:
                slots.release()
            if not sent:
                return
            self.chunks_sent += 1
            self.bytes_sent += len(data)
            self.bytes_done += len(data)
            self._report("transfer")

        failure: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as tasks:
                for index in range(s.chunk_count):
                    wanted = index not in held and not self.committed_meanwhile
                    # The next chunk is read while ``parallel`` are in flight: at most
                    # parallel + 1 chunks are in memory. It goes out as soon as it is read
                    # (its CRC32C is cheap) and is hashed into the whole-file SHA-256 while
                    # it is on its way (4-5 % off a 20 MiB upload: docs/benchmarks.md).
                    data, crc = await asyncio.to_thread(self._read_chunk, index, wanted)
                    if wanted:
                        await slots.acquire()
                        tasks.create_task(send(index, data, crc))
                    await asyncio.to_thread(hasher.update, data)
                    del data
        except ExceptionGroup as group:
            failure = first_error(group)
        if failure is None:
            try:
                self.source.check_unchanged()
            except FileChanged as exc:
                failure = exc
        if failure is not None:
            if isinstance(failure, FileChanged | Conflict):
                await self._discard(failure)
            raise failure
        self.sha256 = hasher.hexdigest()
        if self.declared_sha256 and self.declared_sha256 != self.sha256:
            error = ChecksumMismatch(
                f"{self.source.name}: its bytes hash to {self.sha256}, not to the sha256 "
                f"given ({self.declared_sha256}): the digest is wrong, or the file changed "
                "after it was taken", expected=self.declared_sha256, computed=self.sha256,
                during="read")
            await self._discard(error)
            raise error

    async def finish(self, together: Sequence[ChunkUpload] = ()) -> UploadResult:
        """Finish the session; with ``together`` (other uploads whose chunks are all sent),
        first try to commit them all in one request (``POST /v1/uploads/finish``), so an
        original and its derivatives appear at once. If that fails for any reason, this
        upload finishes alone and the others are left to their own ``finish``, which then
        reports their own errors."""
        if self.result is not None:
            return self.result
        s = self._session()
        assert self.sha256 is not None, "transfer() comes before finish()"
        self._report("finish")
        if together:
            try:
                # The derivatives first: the server adds rows in the order given, and the
                # original's row then finds them all there and queues no derivative job.
                return await self._finish_together([*together, self])
            except MemvaultError as exc:
                log.debug("joint finish of %s failed (%s: %s); finishing it alone",
                          self.source.name, exc.code, exc.detail)
        for round_ in (1, 2, 3):
            try:
                response = await self.api.call(
                    "POST", f"/v1/uploads/{s.id}/finish",
                    json={"size": self.source.size, "sha256": self.sha256})
                break
            except Incomplete as exc:
                missing = [int(i) for i in exc.extra.get("missing") or []]
                if round_ == 3 or not missing or not self.source.seekable:
                    raise
                await self._resend(missing)
            except (ChecksumMismatch, LengthMismatch) as exc:
                await self._discard(exc)
                raise
            except (NotFound, Expired) as exc:
                raise _SessionLost(exc) from exc
        return await self._finished(parse(response, Finished))

    async def _finish_together(self, uploads: list[ChunkUpload]) -> UploadResult:
        items = []
        for upload in uploads:
            session = upload._session()
            assert upload.sha256 is not None, "transfer() comes before finish()"
            items.append({"id": session.id, "size": upload.source.size,
                          "sha256": upload.sha256})
            if upload is not self:
                upload._report("finish")
        answers = (await self.api.fetch(FinishedList, "POST", "/v1/uploads/finish",
                                        json={"uploads": items})).items
        for upload, answer in zip(uploads, answers, strict=True):
            await upload._finished(answer)
        assert self.result is not None
        return self.result

    async def _finished(self, body: Finished) -> UploadResult:
        """Record a finish's answer (the memory comes with it; older servers: read it). The
        resume record goes after the ``done`` callback: if that raises, the call fails, and
        the next one finds the committed session and returns this same result."""
        memory = body.memory
        if memory is None:
            memory = await self.api.fetch(Memory, "GET", f"/v1/memories/{body.memory_id}")
        asset = memory.assets.get(body.role)
        if asset is None:
            raise BadResponse(f"the finish of {body.memory_id} answered without its "
                              f"{body.role!r} asset", http_status=200)
        self.result = UploadResult(
            memory=memory, asset=asset, session_id=self._session().id,
            chunks_sent=self.chunks_sent, chunks_skipped=self.chunks_skipped,
            bytes_sent=self.bytes_sent,
        )
        self._report("done")
        if self.state is not None:
            self.state.drop_upload(self.record_key)
        return self.result

    async def abort(self) -> None:
        """Abort the session (if any) and forget it; the server drops what it received."""
        if self.session is not None:
            await self._abort_quietly(self.session.id)
        self.forget()

    def forget(self) -> None:
        if self.state is not None:
            self.state.drop_upload(self.record_key)
        self.session = None
        self.result = None
        self.memory_id = self.target_memory
        self.chunks_sent = self.chunks_skipped = self.bytes_sent = self.bytes_done = 0

    # -- requests --------------------------------------------------------------------------

    async def _begin(self) -> Session:
        body: dict[str, Any] = {
            "capsule_id": self.capsule_id, "role": self.role, "filename": self.source.name,
            "content_type": self.content_type or "application/octet-stream",
            "size": self.source.size,
            "idempotency_key": self.idempotency_key,
        }
        if self.target_memory is not None:
            body["memory_id"] = self.target_memory
        if self.declared_sha256 is not None:
            body["sha256"] = self.declared_sha256
        return await self.api.fetch(Session, "POST", "/v1/uploads", json=body)

    async def _status(self, session_id: str) -> Session | None:
        try:
            return await self.api.fetch(Session, "GET", f"/v1/uploads/{session_id}")
        except (NotFound, Expired):
            return None

    async def _put(self, index: int, data: bytes, crc: int) -> bool:
        """Send chunk ``index``; False if the session was committed meanwhile."""
        s = self._session()
        digest = base64.b64encode(crc.to_bytes(4, "big")).decode()
        try:
            await self.api.call(
                "PUT", f"/v1/uploads/{s.id}/chunks/{index}", content=data,
                headers={"Content-Type": "application/octet-stream",
                         "Content-Digest": f"crc32c=:{digest}:"})
        except (NotFound, Expired) as exc:
            raise _SessionLost(exc) from exc
        except Conflict as exc:
            if exc.extra.get("state") == "committed":
                self.committed_meanwhile = True
                return False
            exc.add_note(f"{self.source.name}: chunk {index} differs from the bytes the "
                         "server received for it earlier: the file changed")
            raise
        return True

    async def _resend(self, indices: list[int]) -> None:
        for index in indices:
            data = await asyncio.to_thread(self.source.read, *self._span(index))
            if not await self._put(index, data, crc32c.crc32c(data)):
                return
            self.bytes_sent += len(data)
            self.chunks_sent += 1

    async def _abort_quietly(self, session_id: str) -> None:
        await abort_quietly(self.api, session_id)

    async def _discard(self, reason: BaseException) -> None:
        """Abort a session that can never finish, noting it on ``reason``."""
        if self.session is None:
            return
        session_id = self.session.id
        if self.before_discard is not None:
            await self.before_discard()
        try:
            await asyncio.shield(self._abort_quietly(session_id))
        except MemvaultError as exc:
            reason.add_note(f"aborting upload session {session_id} failed too: {exc.code}: "
                            f"{exc.detail}; it expires by itself")
        else:
            reason.add_note(f"upload session {session_id} was aborted; the next upload of "
                            "this file starts over")
        self.forget()

    # -- helpers ---------------------------------------------------------------------------

    def _session(self) -> Session:
        if self.session is None:
            raise RuntimeError("open() comes first")
        return self.session

    def _span(self, index: int) -> tuple[int, int]:
        cs = self._session().chunk_size
        offset = index * cs
        return offset, min(cs, self.source.size - offset)

    def _length(self, index: int) -> int:
        return self._span(index)[1]

    def _read_chunk(self, index: int, wanted: bool) -> tuple[bytes, int]:
        """In a worker thread: the chunk's bytes and, if it is to be sent, their CRC32C."""
        data = self.source.read(*self._span(index))
        return data, crc32c.crc32c(data) if wanted else 0

    def _record(self) -> None:
        if self.state is None or self.session is None:
            return
        self.state.save_upload(self.record_key, UploadRecord(
            session_id=self.session.id, fingerprint=self.fingerprint, server=self.api.url,
            capsule_id=self.capsule_id, role=self.role, memory_id=self.target_memory,
            path=str(self.source.path), saved_at=time.time(),
        ))

    def _report(self, phase: Phase) -> None:
        if self.on_progress is None or self.session is None:
            return
        self.on_progress(Progress(
            filename=self.source.name, role=self.role, phase=phase,
            bytes_done=self.bytes_done, total=self.source.size, bytes_sent=self.bytes_sent,
            chunks_done=self.chunks_skipped + self.chunks_sent,
            chunk_count=self.session.chunk_count,
        ))

