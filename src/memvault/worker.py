"""Background work: the session reaper and the derivative job runner.

``memvault serve`` runs both inside the server process; ``memvault worker`` runs them alone,
for scale-out (servers started with ``MEMVAULT_DERIVATIVE_WORKERS=0`` take uploads, workers
make derivatives). Any number of either may run against one database: a session is expired by
exactly one reaper (a conditional update by id) and a job is held by one worker (a lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

import structlog

from memvault import logs
from memvault.clock import Clock
from memvault.http.deps import Services
from memvault.jobs.runner import DerivativeRunner
from memvault.settings import Settings

log = structlog.get_logger("memvault")


async def reap_forever(services: Services, interval: float) -> None:
    """Every ``interval`` seconds: expire sessions past their TTL, sweep orphaned staging,
    collect placed blobs no commit came to use. Each duty runs whatever the others did."""
    sessions = services.uploads.sessions
    while True:
        await asyncio.sleep(interval)
        services.metrics.reaper_runs.inc()
        try:
            expired = await sessions.expire_due()
        except Exception:
            # Logged with its traceback and retried next round; never silently swallowed.
            log.exception("reaper.failed")
        else:
            services.metrics.expired.inc(expired)
            if expired:
                log.info("reaper.run", expired=expired)
        try:
            await sessions.sweep_staging()
        except Exception:
            log.exception("reaper.sweep_failed")
        try:
            await sessions.placements.collect()
        except Exception:
            log.exception("reaper.collect_failed")


def derivative_runner(settings: Settings, services: Services) -> DerivativeRunner:
    return DerivativeRunner(
        services.jobs, services.store, workers=max(1, settings.derivative_workers),
        timeout=settings.derivative_timeout, memory_limit=settings.derivative_memory_limit,
        options=settings.derivative_options(),
    )


@contextlib.asynccontextmanager
async def background(settings: Settings, services: Services) -> AsyncIterator[None]:
    """Run the reaper and, unless ``derivative_workers`` is 0, the derivative runner, until
    the block exits; then stop them and the worker processes."""
    tasks = [asyncio.create_task(reap_forever(services, settings.reaper_interval))]
    if settings.derivative_workers > 0:
        services.runner = derivative_runner(settings, services)
        tasks.append(asyncio.create_task(services.runner.run()))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if services.runner is not None:
            await services.runner.close()


async def run_worker(settings: Settings, clock: Clock) -> None:
    """``memvault worker``: background work only, until SIGINT or SIGTERM."""
    from memvault.http.app import open_services  # the app imports this module

    if settings.derivative_workers < 1:
        raise ValueError("a worker needs derivative_workers >= 1")
    logs.configure(settings)
    db, services = await open_services(settings, clock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker.start", settings=settings.effective())
    try:
        async with background(settings, services):
            await stop.wait()
    finally:
        await services.uploads.sessions.close()
        await db.dispose()
        log.info("worker.stop")
