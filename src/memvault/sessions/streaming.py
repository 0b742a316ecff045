"""Moving one chunk's bytes from the request to storage, digesting them on the way.

A chunk's body is a ``ChunkBody``: batches of about ``write_batch`` bytes. Read through ASGI
(``PieceBody``), a batch is a list of the pieces the server handed us, not a copy; read by
memvault's own HTTP protocol (``memvault.http.direct``), a batch is one buffer the socket was
read into. Each batch is written and then digested in one worker-thread call while the next
one arrives (through ASGI, in batches of half ``write_batch``; memvault's own protocol holds
one buffer per body and lets the kernel's socket buffer take what arrives meanwhile), so a
chunk in flight holds about ``write_batch`` bytes, whatever the chunk or file size (DESIGN
§3.1), and a batch goes back to its body (``written``) once it is on storage.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import crc32c
import structlog

from memvault.errors import ChecksumMismatch, InvalidArgument, PayloadTooLarge, RequestTimeout
from memvault.hashing import Sha256State
from memvault.sessions.model import ChunkChecksums, Pace
from memvault.storage.base import PartWriter, Piece

log = structlog.get_logger("memvault.sessions")

Batch = Sequence[Piece]
"""Pieces of a body, back to back (``bytes``, or ``memoryview``s of a reused buffer)."""


class ChunkBody(Protocol):
    """A request body as batches of roughly ``batch_bytes`` (the last may be smaller)."""

    def batches(
        self, batch_bytes: int, arrived: Callable[[int], None]
    ) -> AsyncGenerator[Batch, None]:
        """The body's batches; ``arrived(n)`` is told the body's total so far whenever bytes
        arrive (a slow body is judged by its bytes, not by its batches)."""
        ...

    def written(self, batch: Batch) -> None:
        """``batch`` is on storage and digested: its memory may be reused."""


class PieceBody:
    """A body that arrives as arbitrary pieces (ASGI ``http.request`` messages), gathered
    into lists of about half ``batch_bytes``: one is written while the next is gathered, so
    a chunk holds what one buffer holds when memvault's own protocol reads it."""

    def __init__(self, pieces: AsyncIterable[bytes]) -> None:
        self._pieces = pieces

    async def batches(
        self, batch_bytes: int, arrived: Callable[[int], None]
    ) -> AsyncGenerator[Batch, None]:
        batch: list[bytes] = []
        size = seen = 0
        batch_bytes = max(1, batch_bytes // 2)
        async for piece in self._pieces:
            if not piece:
                continue
            seen += len(piece)
            arrived(seen)
            batch.append(piece)
            size += len(piece)
            if size >= batch_bytes:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def written(self, batch: Batch) -> None:
        pass


Body = ChunkBody | AsyncIterable[bytes]
"""What the services take as a chunk's body: either kind (an async iterable of pieces is
gathered into batches)."""


def chunk_body(body: Body) -> ChunkBody:
    return PieceBody(body) if isinstance(body, AsyncIterable) else body


CatchUp = Callable[[Sha256State, int], Awaitable[None]]
"""Hashes the first ``n`` bytes this chunk has written into a state (read back from staging)."""


@dataclass
class ChunkDigests:
    """Digests of one chunk, advanced batch by batch in a worker thread."""

    want_sha256: bool
    prefix: Sha256State | None = None
    """The whole-object hash state, advanced over this chunk as it streams; None while the
    chunk is past the hash frontier."""
    adoption: asyncio.Future[Sha256State] | None = None
    """Set with the state at this chunk's start if a chunk ahead of it hashes its way there
    while this one streams: then ``adopt`` takes it over (see ``frontier``)."""
    catch_up: CatchUp | None = None
    adopted_from: bytes | None = None
    """The stored form of the adopted state, before this chunk's bytes went into it."""
    crc: int = 0
    length: int = 0
    _sha: hashlib._Hash | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.want_sha256:
            self._sha = hashlib.sha256()

    def update(self, pieces: Batch) -> None:
        for piece in pieces:
            self.crc = crc32c.crc32c(piece, self.crc)
            if self._sha is not None:
                self._sha.update(piece)
            if self.prefix is not None:
                self.prefix.update(piece)
            self.length += len(piece)

    async def adopt(self) -> None:
        """Between batches: if the state at this chunk's start has arrived, hash back what
        was written so far and hash the rest in flight. A failure here only leaves the chunk
        to the frontier's catch-up, as if the state had not come."""
        future = self.adoption
        if (self.prefix is not None or future is None or not future.done()
                or future.cancelled() or self.catch_up is None):
            return
        self.adoption = None
        state = future.result()
        parent = state.to_bytes()
        try:
            if self.length:
                await self.catch_up(state, self.length)
        except Exception:  # an optimisation failing: logged, the chunk goes on unhashed
            log.warning("frontier.adopt_failed", exc_info=True)
            return
        self.adopted_from = parent
        self.prefix = state

    def check(self, expected: ChunkChecksums) -> None:
        if expected.crc32c is not None and expected.crc32c != self.crc:
            raise ChecksumMismatch(
                "chunk CRC32C does not match the Content-Digest the client sent",
                expected=f"{expected.crc32c:08x}",
                computed=f"{self.crc:08x}",
            )
        if expected.sha256 is not None:
            assert self._sha is not None
            if self._sha.digest() != expected.sha256:
                raise ChecksumMismatch(
                    "chunk SHA-256 does not match the Content-Digest the client sent",
                    expected=expected.sha256.hex(),
                    computed=self._sha.hexdigest(),
                )


async def stream_chunk(
    body: ChunkBody,
    length: int,
    digests: ChunkDigests,
    writer: PartWriter | None,
    batch_bytes: int,
    pace: Pace,
    arrived: Callable[[int], None] | None = None,
) -> None:
    """Consume exactly ``length`` bytes of ``body`` into ``writer`` (or nowhere, to compare).

    Raises ``PayloadTooLarge`` as soon as the body runs past ``length``, ``InvalidArgument``
    when it ends short and ``RequestTimeout`` when it arrives slower than ``pace``; either way
    the caller treats the chunk as not received. ``arrived(n)`` is told the body's bytes so
    far whenever some arrive.
    """
    start = asyncio.get_running_loop().time()

    def progress(seen: int) -> None:
        _extend(watchdog, pace.deadline(start, seen))
        if arrived is not None:
            arrived(seen)

    try:
        async with asyncio.timeout(pace.deadline(start, 0)) as watchdog:
            seen = await _consume(body, length, digests, writer, batch_bytes, progress)
    except TimeoutError:
        if not watchdog.expired():
            raise
        raise RequestTimeout(
            f"chunk body arrived slower than {pace.min_rate} bytes/s; send it again",
            min_rate=pace.min_rate, retry_after=1,
        ) from None
    if seen != length:
        raise InvalidArgument(
            f"chunk body ended after {seen} of its {length} bytes", received=seen, expected=length
        )


def _extend(watchdog: asyncio.Timeout, deadline: float | None) -> None:
    if not watchdog.expired():  # once expired, the task is being cancelled: too late
        watchdog.reschedule(deadline)


async def _consume(
    body: ChunkBody,
    length: int,
    digests: ChunkDigests,
    writer: PartWriter | None,
    batch_bytes: int,
    progress: Callable[[int], None],
) -> int:
    """Write and digest ``body`` batch by batch; returns the bytes seen."""
    pending: asyncio.Future[None] | None = None
    seen = 0

    async def flush(batch: Batch) -> None:
        reusable = True
        try:
            await digests.adopt()  # every earlier batch is written and digested by now
            if writer is None:
                await asyncio.to_thread(digests.update, batch)
            else:
                # Written, then digested, in one worker-thread call: two hand-offs per batch
                # were measurably slower at 4 in flight (docs/decisions.md).
                await writer.write(batch, digests.update)
        except asyncio.CancelledError:
            # A cancelled call's worker thread goes on (``storage.descriptor``) and may still
            # be reading the batch: its memory must not be read into again.
            reusable = False
            raise
        finally:
            if reusable:
                body.written(batch)

    batches = body.batches(batch_bytes, progress)
    try:
        async for batch in batches:
            seen += sum(len(piece) for piece in batch)
            try:
                if seen > length:
                    raise PayloadTooLarge(
                        f"chunk body is longer than its {length} bytes", limit=length
                    )
                if pending is not None:
                    await pending
            except BaseException:
                body.written(batch)  # in no worker thread's hands yet
                raise
            pending = asyncio.ensure_future(flush(batch))
        if pending is not None:
            await pending
            pending = None
    finally:
        if pending is not None:
            # Never leave a write running behind a failed request: a thread cannot be
            # cancelled, and a late write would land on top of a retry of the same chunk.
            await _settle(pending)
        await batches.aclose()
    return seen


async def _settle(future: asyncio.Future[None]) -> None:
    """Wait until ``future`` is done, even through cancellation; re-raise that afterwards."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait({future})
        except asyncio.CancelledError:
            cancelled = True
    if not future.cancelled():
        future.exception()  # mark retrieved; the caller is already raising its own error
    if cancelled:
        raise asyncio.CancelledError
