"""A file descriptor used from worker threads, closed only once no call on it is running.

A request that is cancelled (its chunk's timeout, the pace watchdog, a client gone) while a
worker thread writes through its descriptor must not close the descriptor under that thread:
the number is reused at once by the next ``open``, and the thread's next ``pwritev`` or
``write`` lands in that other file (a review found a late batch in another session's staging
file). Waiting for the thread instead would keep a request on a hung disk for ever. So the
cancellation goes ahead, and the descriptor (with any lock it holds) is closed when the call
still running on it returns.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Descriptor:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._running: asyncio.Future[Any] | None = None
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a worker thread, one call at a time: a call still running (its
        caller was cancelled) must end before another may start, or ``close`` could lose
        track of it."""
        if self._closed:
            raise ValueError("descriptor closed")
        if self._running is not None and not self._running.done():
            raise RuntimeError("a call on this descriptor is still running")
        call = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
        self._running = call
        result = await asyncio.shield(call)  # cancelled: the call goes on; close() waits
        self._running = None
        return result

    def close(self) -> None:
        """Close now, or as soon as the call still running on it returns."""
        if self._closed:
            return
        self._closed = True
        running, self._running = self._running, None
        if running is not None and not running.done():
            running.add_done_callback(functools.partial(_close_after, self.fd))
        else:
            os.close(self.fd)


def _close_after(fd: int, call: asyncio.Future[Any]) -> None:
    if not call.cancelled():
        call.exception()  # its caller was cancelled and never looked; nothing else will
    os.close(fd)


async def opened(fn: Callable[[], int | None]) -> int | None:
    """The descriptor ``fn`` opens on a worker thread (or None). If the caller is cancelled
    meanwhile, whatever it opened is closed when it returns, not leaked."""
    call = asyncio.get_running_loop().run_in_executor(None, fn)
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        if not call.done():
            call.add_done_callback(_close_result)
        else:
            _close_result(call)
        raise


def _close_result(call: asyncio.Future[int | None]) -> None:
    if call.cancelled() or call.exception() is not None:
        return
    fd = call.result()
    if fd is not None:
        os.close(fd)
