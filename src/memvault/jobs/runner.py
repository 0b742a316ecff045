"""Runs derivative jobs: claims them, decodes in worker processes, stores what they made.

The event loop only orchestrates; decoding runs in a pool of separate processes (pebble),
one job per process at a time, each with a wall-clock limit (the process is killed and
replaced when it runs over) and an address-space limit (a decoder that tries to allocate
past it fails in that process alone). A bad image therefore costs one attempt of one job,
never the queue or the server. ``memvault serve`` runs a runner in-process; ``memvault
worker`` runs one alone, and any number may run against one database.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import multiprocessing
import os
import resource
import secrets
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from pebble import ProcessExpired, ProcessPool

from memvault.derivatives.model import DerivativeOptions
from memvault.errors import Unavailable
from memvault.jobs.queue import UNSUPPORTED, Job, JobQueue, StoredDerivative
from memvault.placement import Placements
from memvault.storage.base import BlobDamaged, BlobStore, LocalPaths

log = structlog.get_logger("memvault.jobs")


class DerivativeRunner:
    def __init__(self, queue: JobQueue, store: BlobStore, *, workers: int, timeout: float,
                 memory_limit: int, options: DerivativeOptions | None = None,
                 poll: float = 1.0) -> None:
        self.queue = queue
        self.options = options or DerivativeOptions()
        self.store = store
        self.placements = Placements(queue.db, store, queue.clock)
        self.workers = workers
        self.timeout = timeout
        self.memory_limit = memory_limit
        self.poll = poll
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._pool: ProcessPool | None = None
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look for work now (a job was just enqueued in this process)."""
        self._wake.set()

    def _processes(self) -> ProcessPool:
        # Started on first use: a server that never receives an image starts no processes.
        if self._pool is None:
            self._pool = ProcessPool(
                max_workers=self.workers, initializer=_limit_memory,
                initargs=(self.memory_limit,), context=multiprocessing.get_context("spawn"),
            )
        return self._pool

    async def run(self) -> None:
        """Claim and process jobs until cancelled, ``workers`` at a time."""
        slots = asyncio.Semaphore(self.workers)
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                await slots.acquire()
                job = None
                try:
                    job = await self.queue.claim(self.worker_id)
                except Exception:
                    log.exception("jobs.claim_failed")  # tried again after the poll interval
                if job is None:
                    slots.release()
                    await self._idle()
                    continue
                task = asyncio.create_task(self._process(job))
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(lambda _: slots.release())
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _idle(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.poll):
                await self._wake.wait()
        self._wake.clear()

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.stop()  # type: ignore[no-untyped-call]
            await asyncio.to_thread(pool.join)

    async def _process(self, job: Job) -> None:
        renewing = asyncio.create_task(self._keep_lease(job))
        try:
            await self._derive(job)
        except asyncio.CancelledError:
            raise  # shutting down: the lease lapses and another worker takes the job
        except _Postponed as later:
            log.info("jobs.postponed", memory_id=job.memory_id, reason=str(later.__cause__))
            await self.queue.postpone(job, self.worker_id, max(later.delay, self.queue.backoff))
        except Exception as exc:
            log.exception("jobs.error", memory_id=job.memory_id)
            await self.queue.fail(job, self.worker_id, f"{type(exc).__name__}: {exc}")
        finally:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)

    async def _keep_lease(self, job: Job) -> None:
        while True:
            await asyncio.sleep(self.queue.lease / 3)
            if not await self.queue.renew(job, self.worker_id):
                return

    async def _derive(self, job: Job) -> None:
        from memvault.derivatives import Unsupported, make_derivatives
        from memvault.derivatives.decode import SNIFF_BYTES, not_an_image

        if set(job.missing) <= job.coming:
            # Nothing a client is not already uploading (or nothing at all) is missing: no
            # decode. ``complete`` defers the job while those sessions are pending, so a
            # role whose upload is then abandoned is still made.
            await self.queue.complete(job, self.worker_id, [], None)
            return
        if not isinstance(self.store, LocalPaths):
            # Fetching the original costs its whole size here (a video may be GBs): its
            # first bytes decide first whether it can be an image at all.
            head = b"".join([piece async for piece in self.store.read(
                job.storage_key, 0, min(SNIFF_BYTES, job.size), size=job.size)])
            refusal = not_an_image(head)
            if refusal is not None:
                await self.queue.finish(job, self.worker_id, UNSUPPORTED,
                                        f"{refusal.code}: {refusal.reason}")
                log.info("jobs.unsupported", memory_id=job.memory_id, reason=refusal.reason)
                return
        async with self._source(job) as path:
            future = self._processes().schedule(make_derivatives,
                                                args=(str(path), self.options),
                                                timeout=self.timeout)
            try:
                made = await asyncio.wrap_future(future)
            except Unsupported as exc:
                await self.queue.finish(job, self.worker_id, UNSUPPORTED,
                                        f"{exc.code}: {exc.reason}")
                log.info("jobs.unsupported", memory_id=job.memory_id, reason=exc.reason)
                return
            except TimeoutError:
                state = await self.queue.fail(
                    job, self.worker_id, f"took longer than {self.timeout:g} s")
                log.warning("jobs.timeout", memory_id=job.memory_id, state=state)
                return
            except (ProcessExpired, MemoryError) as exc:
                why = str(exc) or ("it ran out of memory" if isinstance(exc, MemoryError)
                                   else type(exc).__name__)
                if isinstance(exc, MemoryError) and self.memory_limit > 0:
                    why += f" (MEMVAULT_DERIVATIVE_MEMORY_LIMIT is {self.memory_limit} bytes)"
                state = await self.queue.fail(
                    job, self.worker_id, f"the decoder process failed: {why}")
                log.warning("jobs.crashed", memory_id=job.memory_id, state=state, error=str(exc))
                return
        staged = [
            await self._store(d.role, d.data, d.content_type)
            for d in (made.display, made.thumb, made.placeholder)
            if d.role in job.missing
        ]
        stored = [d for _, d in staged]
        try:
            if await self.queue.complete(job, self.worker_id, stored, made.thumbhash):
                log.info("jobs.done", memory_id=job.memory_id, roles=[d.role for d in stored])
        finally:
            # Where storage keys are not content addresses (S3), bytes that no blob row came
            # to name (same content stored before, a role filled meanwhile, a lost lease)
            # are a second copy nobody will read: drop them.
            unused = await asyncio.shield(self.queue.unnamed(stored))
            for key, d in staged:
                if d.storage_key in unused:
                    await asyncio.shield(self.store.discard(key))

    @contextlib.asynccontextmanager
    async def _source(self, job: Job) -> AsyncIterator[Path]:
        """A local file with the original: the blob itself, or a spooled copy of it."""
        if isinstance(self.store, LocalPaths):
            path = self.store.blob_path(job.storage_key)
            stored = (await asyncio.to_thread(path.stat)).st_size
            if stored != job.size:
                # Derivatives of damaged bytes would look like the memory's (the job fails,
                # and says why; `memvault blobs check` lists the asset).
                raise BlobDamaged(job.storage_key, stored, job.size, where="on disk")
            yield path
            return
        fd, name = tempfile.mkstemp(prefix="memvault-original-")
        try:
            with os.fdopen(fd, "wb") as f:
                async for piece in self.store.read(job.storage_key, 0, job.size,
                                                   size=job.size):
                    await asyncio.to_thread(f.write, piece)
            yield Path(name)
        finally:
            os.unlink(name)

    async def _store(self, role: str, data: bytes,
                     content_type: str) -> tuple[str, StoredDerivative]:
        """Write one derivative as a blob (no row yet: ``complete`` adds it); returns its
        staging key with it."""
        sha = hashlib.sha256(data).hexdigest()
        key = await self.store.stage(f"drv_{secrets.token_hex(16)}")
        try:
            writer = await self.store.open_writer(key, 0, length=len(data), part=0)
            try:
                await writer.write([data])
            except BaseException:
                await asyncio.shield(writer.abandon())
                raise
            receipt = await writer.close(durable=True)
            await self.store.seal(key, len(data), [receipt] if data else [])
            try:
                await self.placements.reserve([(sha, len(data))])
            except Unavailable as busy:  # the same content is being collected this second
                raise _Postponed(busy.retry_after or 1.0) from busy
            storage_key = await self.store.commit(key, sha, len(data))
        except BaseException:
            await asyncio.shield(self.store.discard(key))
            raise
        return key, StoredDerivative(role, sha, len(data), storage_key, content_type,
                                     reserved=self.placements.reserving)


class _Postponed(Exception):
    """A passing condition that is nobody's failure (a derivative's content being collected
    at that second): the job runs again later without using an attempt. Only that; other
    ``unavailable`` errors (a store refusing) are failures that use one, so a lasting one
    ends the job instead of retrying it for ever."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.delay = delay


def _limit_memory(limit: int) -> None:
    """In each decoder process: cap its address space, so a runaway decode fails there."""
    if limit > 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
