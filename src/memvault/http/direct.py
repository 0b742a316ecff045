"""Chunk bodies read from the socket straight into reused buffers (under ``memvault serve``).

Through ASGI, a chunk's bytes are copied twice before storage sees them (from the kernel
into a new ``bytes`` per socket read, then by the HTTP parser into each body piece), and
every piece costs a handful of Python calls (parser callback, event, ``receive``,
Starlette's stream). For ``PUT /v1/uploads/{id}/chunks/{index}``, memvault's own HTTP
protocol (``memvault.http.server``) instead reads the body with ``recv_into`` into buffers
of ``write_batch`` bytes taken from a pool, and the route takes each full buffer as one
batch: one copy out of the kernel, one Python call per socket read, and memory that was
touched before instead of fresh pages for every read (docs/decisions.md, "Chunk bodies
read straight into reused buffers").

The route finds the body in ``scope["extensions"][EXTENSION]``. Under any other ASGI
server (granian, the test suite's in-process transport) the extension is absent and the
body is read through ASGI as before: the two paths feed the same ``stream_chunk``.

Flow, so that memory stays bounded by what the session core has admitted:

- nothing of the body beyond the read that carried its head is taken from the socket until
  the route first asks for it (after authentication and the chunk's claim), so a refused
  request never holds more than one read of its body;
- then at most ``DEPTH`` buffers per body are out (filling, full, or being written), and
  reading pauses while all are: with one, the socket is not read while its buffer is being
  written, and the kernel's receive buffer takes what the client sends meanwhile;
- if the response goes out before the whole body has been read (an error), the rest is
  read into a scratch buffer and dropped, so the connection stays usable (as uvicorn does);
  the protocol closes it instead when the body is longer than any chunk, or when the client
  was waiting for "100 Continue" and never got it (``memvault.http.server``).
"""

from __future__ import annotations

import asyncio
import mmap
import re
from collections import deque
from collections.abc import AsyncGenerator, Callable

from memvault.sessions import Batch

EXTENSION = "memvault.direct_body"
DEPTH = 1
"""Buffers one body may hold at once. One is enough: while it is being written, the kernel's
socket buffer goes on receiving. A second one, measured, gained nothing; for the same memory,
one buffer twice the size saves per-batch work (docs/decisions.md, "2 MiB write batches")."""

CHUNK_PATH = re.compile(r"^/v1/uploads/[^/]+/chunks/[^/]+$")
"""The requests whose bodies are chunks (read directly, exempt from the JSON body limit)."""


class BufferPool:
    """Buffers of one size, kept for reuse (up to ``keep`` of them) once given back.

    Each is a private anonymous mapping of its own rather than a ``bytearray``: page-aligned,
    its memory exactly its size and, once dropped, back to the system instead of left in a
    malloc arena (with 2 MiB buffers, 8 chunks in flight peaked 2-4 MiB lower this way)."""

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self._free: list[mmap.mmap] = []

    def take(self) -> mmap.mmap:
        return self._free.pop() if self._free else mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE)

    def give(self, buffer: mmap.mmap) -> None:
        if len(self._free) < self.keep:
            self._free.append(buffer)


class DirectBody:
    """One request's body: filled by the protocol (on the event loop), read by the route.

    Producer side (the protocol): ``early`` for body bytes the parser delivered with the
    head, then ``space``/``received`` for each socket read, ``lost`` when the connection
    drops and ``response_sent`` when the response is complete. Consumer side (the session
    core, through ``ChunkBody``): ``batches`` and ``written``.
    """

    def __init__(
        self,
        length: int,
        pool: BufferPool,
        pause: Callable[[], None],
        resume: Callable[[], None],
        scratch: memoryview,
        asked: Callable[[], None] = lambda: None,
    ) -> None:
        self.length = length
        self.due = length
        """Bytes of the body still to be read from the socket."""
        self._pool = pool
        self._pause, self._resume = pause, resume
        self._scratch = scratch
        self._on_ask = asked  # e.g. "100 Continue" to a client waiting for it
        self._early: list[bytes] = []
        self._current: mmap.mmap | None = None
        self._filled = 0
        self._ready: deque[memoryview] = deque()
        self._out = 0  # buffers taken from the pool and not given back yet
        self._waiter: asyncio.Future[None] | None = None
        self._arrived: Callable[[int], None] | None = None
        self._asked = False
        self._paused = False
        self._ended = False  # no more bytes will be handed to the route
        self._dropping = False  # the response is out: read what is still due, keep nothing
        if self.due:
            self._hold()  # until the route asks

    # -- producer (the protocol, on the event loop) -------------------------------------

    def early(self, data: bytes) -> None:
        """Body bytes that arrived in the same read as the head (through the parser)."""
        take = min(len(data), self.due)
        if self._dropping or self._ended:
            self.due -= take
            return
        self._early.append(data[:take] if take < len(data) else data)
        self._received_bytes(take)
        self._wake()

    def space(self) -> memoryview:
        """Where the next read goes: never longer than what is still due."""
        if self._dropping or self._ended:
            return self._scratch[: min(len(self._scratch), self.due)]
        if self._current is None:
            self._current = self._pool.take()
            self._out += 1
            self._filled = 0
        end = min(len(self._current), self._filled + self.due)
        return memoryview(self._current)[self._filled:end]

    def received(self, nbytes: int) -> bool:
        """``nbytes`` were read into ``space()``; True once the whole body has been read."""
        if self._dropping or self._ended:
            self.due -= nbytes
            return not self.due
        self._filled += nbytes
        current = self._current
        assert current is not None
        if self._filled == len(current) or nbytes == self.due:
            self._ready.append(memoryview(current)[: self._filled])
            self._current = None
            self._wake()
        self._received_bytes(nbytes)
        if self.due and self._current is None and self._out >= DEPTH:
            self._hold()
        return not self.due

    def lost(self) -> None:
        """The connection dropped: the route sees the body end short."""
        self._end()

    def response_sent(self) -> None:
        """The response is complete; whatever of the body is still due is read and dropped."""
        self._dropping = True
        self._give_back_unread()
        self._end()
        self._let_go()

    # -- consumer (the route, through the session core) ---------------------------------

    async def batches(
        self, batch_bytes: int, arrived: Callable[[int], None]
    ) -> AsyncGenerator[Batch, None]:
        """Each full buffer as a batch (``batch_bytes`` is the buffers' size already)."""
        self._arrived = arrived
        try:
            if not self._asked:
                self._asked = True
                self._on_ask()
            self._let_go()
            if self.length - self.due:
                arrived(self.length - self.due)
            while True:
                if self._early:
                    early, self._early = self._early, []
                    yield early
                elif self._ready:
                    yield [self._ready.popleft()]
                elif self._ended:
                    return
                else:
                    self._waiter = asyncio.get_running_loop().create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
        finally:
            self._arrived = None

    def written(self, batch: Batch) -> None:
        for piece in batch:
            if isinstance(piece, memoryview) and isinstance(piece.obj, mmap.mmap):
                self._give(piece.obj)
        self._let_go()

    # -- internals -------------------------------------------------------------------------

    def _received_bytes(self, nbytes: int) -> None:
        self.due -= nbytes
        if not self.due:
            self._end()
        if self._arrived is not None:
            self._arrived(self.length - self.due)

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            if self._dropping or self.due:
                self._give_back_unread()
            self._wake()

    def _give_back_unread(self) -> None:
        """Buffers the route has not taken (the body ended short, or nobody will read it)."""
        if self._current is not None:
            self._give(self._current)
            self._current = None
        while self._ready:
            self._give(self._ready.popleft().obj)  # type: ignore[arg-type]
        self._early = []

    def _give(self, buffer: mmap.mmap) -> None:
        self._out -= 1
        self._pool.give(buffer)

    def _hold(self) -> None:
        if not self._paused:
            self._paused = True
            self._pause()

    def _let_go(self) -> None:
        """Resume reading once the route has asked and a buffer is free (or all is dropped)."""
        if self._paused and (self._dropping or self._ended
                             or (self._asked and self._out < DEPTH)):
            self._paused = False
            self._resume()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
