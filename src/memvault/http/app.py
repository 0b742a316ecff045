"""The composition root: ``create_app(settings)`` builds everything; nothing exists at import."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from fastapi import FastAPI
from sqlalchemy.exc import SQLAlchemyError

from memvault import __version__, logs
from memvault.admission import TransferSlots
from memvault.auth import AuthService
from memvault.capsules import CapsuleService
from memvault.clock import Clock, SystemClock
from memvault.errors import Conflict, InsufficientStorage, Unavailable
from memvault.http import asset_routes, library_routes, ops_routes, problems, upload_routes
from memvault.http.deps import Services
from memvault.http.head import HeadAsGet
from memvault.http.limits import JsonBodyLimit
from memvault.jobs.queue import JobQueue
from memvault.metadata import Database
from memvault.metadata.migrate import (
    SchemaTooNew,
    current_revision,
    probe_write,
    schema_state,
    upgrade,
)
from memvault.metrics import Metrics
from memvault.sessions.handoff import FrontierListener
from memvault.settings import Settings, redact
from memvault.storage.base import PartHolder
from memvault.storage.factory import close_blob_store, open_blob_store
from memvault.uploads import UploadService
from memvault.worker import background

log = structlog.get_logger("memvault")


class SchemaOutOfDate(RuntimeError):
    pass


class NoDatabase(RuntimeError):
    pass


class DatabaseUnusable(RuntimeError):
    def __init__(self, url: str, exc: BaseException) -> None:
        cause = getattr(exc, "orig", None) or exc
        reason = (str(cause) or type(cause).__name__).splitlines()[0]
        super().__init__(f"cannot use the database at {redact(url)}: {reason}")


async def open_services(
    settings: Settings, clock: Clock, metrics: Metrics | None = None, *, create: bool = True
) -> tuple[Database, Services]:
    """Open the metadata store (migrating or checking it) and build every service.

    With ``create=False`` (the operator commands other than ``serve``), an embedded data
    folder must already hold its database: a mistyped ``--data`` is said so instead of
    quietly becoming a new, empty vault."""
    if not create and settings.database_in_data_dir and not settings.sqlite_file.is_file():
        raise NoDatabase(f"no memvault database in {settings.data_dir} — check --data (or "
                         "MEMVAULT_DATA_DIR); `memvault serve` makes one on its first start")
    prepare_data_dir(settings)
    url = settings.resolved_database_url
    try:
        if settings.migrate_on_start:
            await upgrade(url)
        db = Database.open(url)
    except (OSError, SQLAlchemyError) as exc:
        raise DatabaseUnusable(url, exc) from exc
    try:
        try:
            state = await schema_state(db)
        except (OSError, SQLAlchemyError, Unavailable) as exc:
            raise DatabaseUnusable(url, exc.__cause__ or exc) from exc
        if state == "ahead":
            raise SchemaTooNew(str(await current_revision(db)))
        if state == "behind" and not settings.migrate_on_start:
            raise SchemaOutOfDate(
                "the database schema is out of date: run `memvault db upgrade`")
    except BaseException:
        await db.dispose()
        raise
    try:
        store = await open_blob_store(settings)
    except BaseException:
        await db.dispose()
        raise
    capsules = CapsuleService(db, clock)
    services = Services(
        auth=AuthService(db, clock),
        capsules=capsules,
        uploads=UploadService(db, store, clock, settings, capsules),
        store=store,
        slots=TransferSlots(settings.transfer_slots, settings.slots_per_principal),
        metrics=metrics or Metrics(),
        settings=settings,
        db=db,
        jobs=JobQueue(db, clock, lease=settings.derivative_lease,
                      max_attempts=settings.derivative_attempts),
    )
    return db, services


def prepare_data_dir(settings: Settings) -> None:
    """Make the data folder (0700) and, for the embedded default, an empty database file
    (0600; SQLite gives its WAL the same mode): token hashes and everyone's metadata are
    for the service's user alone, like the blob files. Existing ones are left as they are."""
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if settings.database_in_data_dir:
        with contextlib.suppress(FileExistsError):
            os.close(os.open(settings.sqlite_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


async def ensure_admin(settings: Settings, auth: AuthService) -> None:
    """On first start, make the ``admin`` principal and leave its token in the data dir."""
    if await auth.has_principals():
        return
    try:
        _, token = await auth.create_principal("admin", is_admin=True)
    except Conflict:
        return  # another process got there first
    path = Path(settings.data_dir) / "admin.token"
    # A new file, 0600 from its first byte, then renamed over whatever a former vault left
    # at that name (whose mode might be anything).
    partial = path.with_name(f"admin.token.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(partial, path)
    log.warning("admin.created", token_file=str(path.resolve()),
                hint="use this token as 'Authorization: Bearer <token>'")


async def preflight(settings: Settings, *, create: bool = True) -> None:
    """Open and close everything ``serve`` (or ``worker``) needs, so that what an operator
    must fix (a data folder that cannot be written, a database that cannot be reached or is
    of another version, a blob store that refuses) is found before it starts, and said in
    one sentence (``startup_problem``) rather than a traceback from inside uvicorn."""
    db, services = await open_services(settings, SystemClock(), create=create)
    try:
        await services.store.check()
        try:
            # Reads pass on a database SQLite opened read-only (a file of mode 444, or
            # another user's): a server that cannot record one upload must not start.
            await probe_write(db)
        except (OSError, SQLAlchemyError, Unavailable, InsufficientStorage) as exc:
            # (A full database is a 507 to a request; at start, a reason not to.)
            typed = isinstance(exc, Unavailable | InsufficientStorage)
            cause = exc.__cause__ if typed and exc.__cause__ else exc
            raise DatabaseUnusable(settings.resolved_database_url, cause) from exc
    finally:
        await services.uploads.sessions.close()
        await close_blob_store(services.store)
        await db.dispose()


def startup_problem(exc: BaseException) -> str | None:
    """One sentence for a failure to open the services that the operator can act on; None
    for anything else (a bug: its traceback is what helps then)."""
    known = SchemaOutOfDate | SchemaTooNew | NoDatabase | DatabaseUnusable | ValueError
    if isinstance(exc, known):
        return str(exc)
    if isinstance(exc, Unavailable):  # the blob store unreachable, say
        return exc.detail
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return None


@contextlib.asynccontextmanager
async def frontier_handoff(settings: Settings, services: Services) -> AsyncIterator[None]:
    """On PostgreSQL with a store whose parts only their receiver can read before the seal
    (S3), hear every process's frontier moves (``memvault.sessions.handoff``)."""
    if services.db.dialect != "postgresql" or not isinstance(services.store, PartHolder):
        yield
        return
    frontier = services.uploads.sessions.hash_frontier
    url = settings.listen_database_url or settings.resolved_database_url
    listener = FrontierListener(url, frontier.moved)
    await listener.start()
    frontier.handoff_wait = settings.frontier_handoff_wait
    try:
        yield
    finally:
        frontier.handoff_wait = 0.0
        await listener.close()


def create_app(settings: Settings | None = None, clock: Clock | None = None) -> FastAPI:
    """The ASGI app; with no arguments it reads ``MEMVAULT_*`` (e.g. as a granian factory)."""
    settings = settings or Settings()
    clock = clock or SystemClock()
    logs.configure(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("memvault.start", version=__version__, settings=settings.effective())
        db, services = await open_services(settings, clock, metrics)
        app.state.services = services
        app.state.db = db
        await ensure_admin(settings, services.auth)
        try:
            async with frontier_handoff(settings, services), background(settings, services):
                yield
            # Requests a graceful shutdown cancelled (it ran out of time) wind down and
            # answer (``LastResort``) before the services they use close under them.
            if app.state.requests:
                await asyncio.wait(set(app.state.requests), timeout=5)
        finally:
            await services.uploads.sessions.close()
            await close_blob_store(services.store)
            await db.dispose()
            log.info("memvault.stop")

    app = FastAPI(
        title="memvault",
        version=__version__,
        summary="Resumable, verified uploads of memories into capsules",
        lifespan=lifespan,
        # No 307 from "/v1/capsules/" to "/v1/capsules": it answered before authentication,
        # with an http:// Location wrong behind a TLS proxy, and a client taking a redirect
        # for success thought `DELETE /v1/uploads/` had aborted something. A 404 instead.
        redirect_slashes=False,
    )
    metrics = Metrics()
    app.state.metrics = metrics
    app.state.requests = set()  # the request tasks running (``problems.LastResort``)
    app.add_middleware(JsonBodyLimit, limit=settings.max_json_bytes)
    app.add_middleware(HeadAsGet)
    problems.install(app)
    app.include_router(library_routes.router)
    app.include_router(upload_routes.router)
    app.include_router(asset_routes.router)
    app.include_router(ops_routes.router)
    return app
