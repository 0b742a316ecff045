"""The ``memvault`` command: run the server, mint tokens, migrate the database; and, as a
client of any memvault server, log in, make capsules, upload, list and download
(``memvault.commands`` holds the client commands' logic, over the SDK)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from memvault.auth import AuthService
    from memvault.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="memvault: resumable uploads of memories into capsules.")
token_app = typer.Typer(no_args_is_help=True, help="API tokens.")
db_app = typer.Typer(no_args_is_help=True, help="The metadata database.")
blobs_app = typer.Typer(no_args_is_help=True, help="Stored blobs (data folder or S3 bucket).")
app.add_typer(token_app, name="token")
app.add_typer(db_app, name="db")
app.add_typer(blobs_app, name="blobs")
capsule_app = typer.Typer(no_args_is_help=True, help="Capsules on the server you logged in to.")
admin_app = typer.Typer(no_args_is_help=True, help="Operator views (an admin token).")
app.add_typer(capsule_app, name="capsule", rich_help_panel="Client")
app.add_typer(admin_app, name="admin", rich_help_panel="Client")

DataOpt = Annotated[Path | None, typer.Option("--data", help="data folder (MEMVAULT_DATA_DIR)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="one JSON document on stdout, for scripts")]


def _settings(data: Path | None, **flags: Any) -> Settings:
    from pydantic import ValidationError

    from memvault.settings import Settings  # here, so client commands start without it

    given: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    if data is not None:
        given["data_dir"] = data
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(_setting_problem(e) for e in exc.errors())
        typer.echo(f"memvault: bad settings: {problems}", err=True)
        raise typer.Exit(2) from exc
    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        typer.echo(f"memvault: the data folder {settings.data_dir} is a file; give a folder "
                   "(--data or MEMVAULT_DATA_DIR)", err=True)
        raise typer.Exit(2)
    from memvault import logs

    # Before anything is logged: the checks ahead of the start log in the format asked for,
    # on stderr (structlog's default is its console format on stdout).
    logs.configure(settings)
    return settings


def _setting_problem(error: Any) -> str:
    """``MEMVAULT_CHUNK_SIZE: Input should be greater than or equal to 1 (got 0)``."""
    field = ".".join(str(part) for part in error.get("loc", ()))
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if not field:  # a check across settings: its message names them
        return message
    given = error.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"MEMVAULT_{field.upper()}: {message}{shown}"


def _operator_command(body: Any) -> Any:
    """Run an operator command's coroutine; what the operator must fix (``startup_problem``)
    is one sentence on stderr and exit code 2, not a traceback."""
    from memvault.http.app import startup_problem

    try:
        return asyncio.run(body)
    except Exception as exc:
        problem = startup_problem(exc)
        if problem is None:
            raise
        typer.echo(f"memvault: {problem}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def serve(
    data: DataOpt = None,
    host: Annotated[str | None, typer.Option(help="listen address (MEMVAULT_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="listen port (MEMVAULT_PORT)")] = None,
) -> None:
    """Run the HTTP server (embedded default: SQLite + files under the data folder)."""
    from memvault.http import server
    from memvault.http.app import create_app, preflight

    settings = _settings(data, host=host, port=port)
    _operator_command(preflight(settings))
    server.run(create_app(settings), settings)


@app.command()
def worker(
    data: DataOpt = None,
    processes: Annotated[int | None, typer.Option(
        help="derivative worker processes (MEMVAULT_DERIVATIVE_WORKERS; default: cores)")] = None,
) -> None:
    """Run background work alone: derivative jobs and the session reaper (for scale-out)."""
    from memvault.clock import SystemClock
    from memvault.http.app import preflight
    from memvault.worker import run_worker

    settings = _settings(data, derivative_workers=processes)
    if settings.derivative_workers < 1:
        typer.echo("memvault: a worker needs at least one process (--processes N)", err=True)
        raise typer.Exit(2)
    # A worker serves the servers' database: it never makes a new one.
    _operator_command(preflight(settings, create=False))
    asyncio.run(run_worker(settings, SystemClock()))


@token_app.command("create")
def token_create(
    name: str,
    data: DataOpt = None,
    admin: Annotated[bool, typer.Option(help="make the principal an administrator")] = False,
) -> None:
    """Create a principal NAME and print its bearer token (shown only this once)."""
    async def create(auth: AuthService) -> str:
        _, token = await auth.create_principal(name, is_admin=admin)
        return token

    typer.echo(_with_auth(data, create))


@token_app.command("rotate")
def token_rotate(name: str, data: DataOpt = None) -> None:
    """Revoke every token of the principal NAME and print a new one (shown only this once).

    For a token that leaked or a device that was lost; the old tokens stop working at once.
    """
    typer.echo(_with_auth(data, lambda auth: auth.rotate_token(name)))


def _with_auth(data: Path | None, act: Callable[[AuthService], Awaitable[str]]) -> str:
    """``act`` on the principals of the configured database (the server may be running)."""
    from memvault.clock import SystemClock
    from memvault.errors import MemvaultError
    from memvault.http.app import open_services
    from memvault.storage.factory import close_blob_store

    settings = _settings(data)

    async def run() -> str:
        db, services = await open_services(settings, SystemClock(), create=False)
        try:
            return await act(services.auth)
        finally:
            await services.uploads.sessions.close()
            await close_blob_store(services.store)
            await db.dispose()

    try:
        return str(_operator_command(run()))
    except MemvaultError as exc:
        typer.echo(f"memvault: {exc.detail}", err=True)
        raise typer.Exit(1) from exc


@db_app.command("upgrade")
def db_upgrade(data: DataOpt = None) -> None:
    """Apply pending schema migrations."""
    from memvault.http.app import prepare_data_dir
    from memvault.metadata.migrate import upgrade

    settings = _settings(data)

    async def run() -> None:
        prepare_data_dir(settings)
        await upgrade(settings.resolved_database_url)

    _operator_command(run())
    typer.echo("schema is current")


@db_app.command("backup")
def db_backup(
    dest: Annotated[Path, typer.Argument(help="file to write (replaced if it exists)")],
    data: DataOpt = None,
) -> None:
    """Copy the embedded SQLite database to DEST, consistently, while servers run.

    Copy blobs/ after it, not before: then every asset the copy names has its file.
    """
    from memvault.metadata.backup import NotSqlite, backup_sqlite

    settings = _settings(data)
    try:
        backup_sqlite(settings.resolved_database_url, dest)
    except NotSqlite as exc:
        typer.echo("memvault: the database is not SQLite; back PostgreSQL up with its own "
                   "tools (pg_dump, or your provider's snapshots)", err=True)
        raise typer.Exit(2) from exc
    except OSError as exc:
        typer.echo(f"memvault: cannot back up to {dest}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"database copied to {dest}; now copy {settings.data_dir / 'blobs'}")


@blobs_app.command("check")
def blobs_check(
    data: DataOpt = None,
    as_json: JsonOpt = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="also read every blob through and check its SHA-256 (reads all "
        "the stored bytes: as long as copying them)")] = False,
) -> None:
    """Compare the stored blobs with the database (safe while servers run).

    Assets whose blob is gone, or is another size than recorded (truncated, appended to),
    are listed; with --verify, so are those whose bytes no longer have their SHA-256. Any of
    these: exit code 1. In the data folder, files no row names are also registered as
    unused, and the reaper deletes them after an hour unless an upload uses them first. On
    S3 (MEMVAULT_BLOB_STORE) each blob is looked up with a HEAD request (--verify: read
    through with a GET).
    """
    import json

    from memvault.clock import SystemClock
    from memvault.http.app import open_services
    from memvault.placement import BlobCheck
    from memvault.storage.factory import close_blob_store

    settings = _settings(data)
    on_s3 = bool(settings.s3_location)
    where = "in the bucket" if on_s3 else "on disk"

    async def run() -> BlobCheck:
        db, services = await open_services(settings, SystemClock(), create=False)
        try:
            # A bucket that is not there is one sentence, not every blob "missing".
            await services.store.check()
            return await services.uploads.sessions.placements.check(verify=verify)
        finally:
            await services.uploads.sessions.close()
            await close_blob_store(services.store)
            await db.dispose()

    report = _operator_command(run())
    missing = [{"sha256": sha, "memory_id": memory, "role": role}
               for sha, memory, role in report.missing]
    damaged = [{"sha256": d.sha256, "memory_id": d.memory_id, "role": d.role,
                "stored_size": d.stored, "size": d.size} for d in report.damaged]
    corrupt = [{"sha256": c.sha256, "memory_id": c.memory_id, "role": c.role,
                "stored_sha256": c.found} for c in report.corrupt]
    if as_json:
        typer.echo(json.dumps({"files": report.files, "in_use": report.in_use,
                               "registered": report.registered, "missing": missing,
                               "damaged": damaged, "verified": report.verified,
                               "corrupt": corrupt}))
    else:
        typer.echo(f"{report.in_use} blobs in use" if on_s3
                   else f"{report.files} blob files, {report.in_use} blobs in use")
        if report.verified is not None:
            typer.echo(f"{report.verified} blobs read through and hashed again")
        if report.registered:
            typer.echo(f"{len(report.registered)} files no row named are now registered as "
                       "unused; the reaper deletes them after an hour unless an upload uses "
                       "them first:")
            for sha in report.registered:
                typer.echo(f"  {sha}")
        for m in missing:
            typer.echo(f"missing: the {m['role']} of memory {m['memory_id']} "
                       f"(blob {m['sha256']}) is not {where}: upload it again", err=True)
        for d in report.damaged:
            typer.echo(f"damaged: the {d.role} of memory {d.memory_id} (blob {d.sha256}) has "
                       f"{d.stored} bytes {where}, {d.size} expected: restore it from a "
                       "backup, or upload it again", err=True)
        for c in report.corrupt:
            typer.echo(f"corrupt: the {c.role} of memory {c.memory_id} (blob {c.sha256}) "
                       f"holds other bytes (SHA-256 {c.found}): restore it from a backup, "
                       "or upload it again", err=True)
        if not report.registered and report.intact:
            typer.echo("everything matches")
    if not report.intact:
        raise typer.Exit(1)


# -- client commands (over the SDK; logic in memvault.commands) ------------------------------


@app.command(rich_help_panel="Client")
def login(
    url: Annotated[str, typer.Argument(help="the server, e.g. http://127.0.0.1:8080")],
    token: Annotated[str, typer.Option(prompt=True, hide_input=True,
                                       help="your API token (prompted for if not given)")],
) -> None:
    """Check URL and TOKEN with the server, then keep them in your config folder (mode 0600).

    MEMVAULT_URL and MEMVAULT_TOKEN, when set, take precedence over what is kept.
    """
    from memvault.commands import library

    raise typer.Exit(library.login(url, token))


@capsule_app.command("create")
def capsule_create(name: str, as_json: JsonOpt = False) -> None:
    """Create a capsule named NAME."""
    from memvault.commands import library

    raise typer.Exit(library.capsule_create(name, as_json))


@capsule_app.command("list")
def capsule_list(as_json: JsonOpt = False) -> None:
    """Your capsules."""
    from memvault.commands import library

    raise typer.Exit(library.capsule_list(as_json))


@app.command(rich_help_panel="Client")
def upload(
    # Not ``exists=True``: a path that is missing or unreadable fails that path (exit 1),
    # and the others are still uploaded.
    paths: Annotated[list[Path], typer.Argument(metavar="PATH", help="files and folders")],
    capsule: Annotated[str, typer.Option("--capsule", "-c", help="capsule name")],
    parallel: Annotated[int, typer.Option(min=1, max=64, help="chunks in flight per file")] = 4,
    jobs: Annotated[int, typer.Option(min=1, max=16, help="files uploaded at once")] = 2,
    no_derivatives: Annotated[bool, typer.Option(
        "--no-derivatives", help="send originals only (the server makes derivatives)")] = False,
    create: Annotated[bool, typer.Option(
        "--create", help="create the capsule if it does not exist")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Upload files and folders (recursively) into a capsule, one memory per file.

    Files already in the capsule (same SHA-256) are skipped and reported.
    Interrupted (Ctrl-C, network), the same command resumes where the server stopped.
    Exit code 0: all uploaded or present; 1: some failed; 2: usage error; 130: interrupted.
    """
    from memvault.commands import upload as upload_command

    raise typer.Exit(upload_command.upload(
        paths, capsule, parallel=parallel, jobs=jobs, derivatives=not no_derivatives,
        create=create, as_json=as_json))


@app.command(rich_help_panel="Client")
def ls(
    capsule: Annotated[str, typer.Argument(help="capsule name")],
    limit: Annotated[int | None, typer.Option(min=1, help="at most this many")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The memories of a capsule, newest first."""
    from memvault.commands import library

    raise typer.Exit(library.ls(capsule, as_json, limit))


@app.command(rich_help_panel="Client")
def get(
    memory_id: Annotated[str, typer.Argument(metavar="MEMORY_ID")],
    role: Annotated[str, typer.Option(
        help="original, display, thumb or placeholder")] = "original",
    output_path: Annotated[str | None, typer.Option(
        "--output", "-o", metavar="PATH",
        help="file or folder to write (default: the current folder)")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="replace a file that is there with other bytes")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Download one asset of a memory, verified against its SHA-256.

    An interrupted download continues from its .part file (named after the asset's SHA-256).
    A file already there is kept: said so if it holds the same bytes, an error otherwise
    (--force replaces it).
    """
    from memvault.commands import library

    raise typer.Exit(library.get(memory_id, role, output_path, force=force, as_json=as_json))


@app.command(rich_help_panel="Client")
def sessions(
    abort: Annotated[list[str] | None, typer.Option(
        "--abort", metavar="SESSION_ID",
        help="abort this session (repeatable): the server drops what it received")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Your upload sessions in progress, with what each has received; --abort ends some."""
    from memvault.commands import library

    if abort:
        raise typer.Exit(library.abort(abort, as_json))
    raise typer.Exit(library.sessions(as_json, admin=False))


@admin_app.command("sessions")
def admin_sessions(as_json: JsonOpt = False) -> None:
    """Every principal's upload sessions in progress."""
    from memvault.commands import library

    raise typer.Exit(library.sessions(as_json, admin=True))


def main() -> None:
    if "--json" not in sys.argv[1:]:
        app()
        return
    # A script that asked for JSON gets a document for a usage error too (README: "also when
    # the whole command fails"), not only Click's text on stderr.
    from memvault.commands.library import fail

    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:
        # Click's errors (Typer's copy of them in newer versions): a message and an exit
        # code, 2 for usage errors.
        status = getattr(exc, "exit_code", None)
        if not isinstance(status, int) or not hasattr(exc, "format_message"):
            raise
        sys.exit(fail(exc.format_message(), code="usage" if status == 2 else "error",
                      as_json=True, status=status))
    sys.exit(code if isinstance(code, int) else 0)
