"""``Client``: the ``AsyncClient`` API for code without an event loop.

Not a second implementation: every method is the async one, run on a private event loop in a
background thread (one per ``Client``) and waited for. The surface is generated from
``AsyncClient``'s methods (``_blocking``), so the two cannot drift apart. Ctrl-C while a call
waits cancels that call on the loop and waits for it to clean up (an interrupted upload keeps
its resume record, as with ``AsyncClient``) before ``KeyboardInterrupt`` goes on. Progress
callbacks run on the background thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import threading
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

import httpx

from memvault.client.async_client import AsyncClient
from memvault.client.retry import RetryPolicy

P = ParamSpec("P")
T = TypeVar("T")


class _LoopThread:
    """An event loop running in a daemon thread, and a blocking ``run(coro)``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name="memvault-client",
                                       daemon=True)
        self.thread.start()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closed = False

    def _serve(self) -> None:
        self.loop.run_forever()
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError(
                "a Client method was called on the Client's own thread (from a progress "
                "callback?): it would wait for itself for ever; call it once the running "
                "call has returned, or use an AsyncClient there")
        if self.closed:
            coro.close()
            raise RuntimeError("this Client is closed")
        result: concurrent.futures.Future[T] = concurrent.futures.Future()
        settled = threading.Event()
        tasks: list[asyncio.Task[T]] = []

        def start() -> None:
            task = self.loop.create_task(coro)
            tasks.append(task)
            self.tasks.add(task)

            def settle(t: asyncio.Task[T]) -> None:
                self.tasks.discard(t)
                if t.cancelled():
                    result.cancel()
                elif (exc := t.exception()) is not None:
                    result.set_exception(exc)
                else:
                    result.set_result(t.result())
                settled.set()  # (concurrent.futures.wait() never sees a plain cancel())

            task.add_done_callback(settle)

        self.loop.call_soon_threadsafe(start)
        try:
            return result.result()
        except concurrent.futures.CancelledError:
            if self.closed:
                raise RuntimeError("the Client was closed while this call ran") from None
            raise
        except KeyboardInterrupt:
            def cancel() -> None:
                for task in tasks:
                    task.cancel()

            self.loop.call_soon_threadsafe(cancel)
            settled.wait(timeout=60)  # its cleanup (resume records, worker processes) runs
            raise

    def close(self, last: Coroutine[Any, Any, None]) -> None:
        """Refuse new calls, cancel those running (other threads' calls raise) and wait for
        their cleanup, run ``last``, then stop the loop and its thread."""
        if threading.current_thread() is self.thread:
            last.close()
            raise RuntimeError("a Client cannot be closed from its own thread (from a "
                               "progress callback?)")
        self.closed = True

        async def end() -> None:
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await last

        try:
            asyncio.run_coroutine_threadsafe(end(), self.loop).result()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()


def _abandoned(thread: _LoopThread, aio: AsyncClient) -> None:
    """A ``Client`` collected unclosed: say so, as an unclosed file does, and close its
    connections and end its thread (without waiting: this runs wherever the collector
    does)."""
    warnings.warn("memvault Client was never closed (use `with Client(...)` or close())",
                  ResourceWarning, stacklevel=1)
    if thread.closed or thread.loop.is_closed():
        return
    thread.closed = True

    async def end() -> None:
        try:
            await aio.aclose()
        finally:
            thread.loop.stop()

    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
        asyncio.run_coroutine_threadsafe(end(), thread.loop)


def _blocking(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Client, P], T]:
    @functools.wraps(method)
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._thread.run(method(self.aio, *args, **kwargs))

    return call


def _blocking_iter(
    method: Callable[Concatenate[AsyncClient, P], AsyncIterator[T]],
) -> Callable[Concatenate[Client, P], Iterator[T]]:
    @functools.wraps(method)
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        items = method(self.aio, *args, **kwargs)

        async def step() -> T:
            return await anext(items)

        async def close() -> None:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()

        try:
            while True:
                try:
                    yield self._thread.run(step())
                except StopAsyncIteration:
                    return
        finally:
            self._thread.run(close())

    return call


class Client:
    """The blocking client: ``Client(url, token, ...)`` takes ``AsyncClient``'s parameters
    and has its methods, each returning its result instead of a coroutine.

    >>> with Client("http://127.0.0.1:8080", token) as mv:  # doctest: +SKIP
    ...     family = mv.capsule("family", create=True)
    ...     done = mv.upload_file("video.mp4", family, parallel=8)
    ...     for memory in mv.iter_memories(family):
    ...         print(memory.id, sorted(memory.assets))
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
        """``AsyncClient``'s parameters, spelled out so a misspelled option is a type error
        (a test checks that the two signatures stay the same)."""
        self.aio = AsyncClient(
            url, token, retry=retry, timeout=timeout, state_dir=state_dir,
            derivative_workers=derivative_workers, derivative_timeout=derivative_timeout,
            transport=transport, max_connections=max_connections)
        """The async client doing the work (use it only through this object's methods)."""
        self._thread = _LoopThread()
        self._closed = False
        self._finalizer = weakref.finalize(self, _abandoned, self._thread, self.aio)

    @property
    def url(self) -> str:
        return self.aio.url

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        self._thread.close(self.aio.aclose())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    list_capsules = _blocking(AsyncClient.list_capsules)
    create_capsule = _blocking(AsyncClient.create_capsule)
    capsule = _blocking(AsyncClient.capsule)
    create_memory = _blocking(AsyncClient.create_memory)
    get_memory = _blocking(AsyncClient.get_memory)
    list_memories = _blocking(AsyncClient.list_memories)
    iter_memories = _blocking_iter(AsyncClient.iter_memories)
    find_memories = _blocking(AsyncClient.find_memories)
    update_memory = _blocking(AsyncClient.update_memory)
    upload_file = _blocking(AsyncClient.upload_file)
    upload_memory = _blocking(AsyncClient.upload_memory)
    discard_upload = _blocking(AsyncClient.discard_upload)
    prune_state = _blocking(AsyncClient.prune_state)
    list_sessions = _blocking(AsyncClient.list_sessions)
    admin_sessions = _blocking(AsyncClient.admin_sessions)
    get_session = _blocking(AsyncClient.get_session)
    abort_session = _blocking(AsyncClient.abort_session)
    download = _blocking(AsyncClient.download)
