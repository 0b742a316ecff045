"""The ``memvault`` command: run the server, mint tokens, migrate the database."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer

from memvault.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="memvault: resumable uploads of memories into capsules.")
token_app = typer.Typer(no_args_is_help=True, help="API tokens.")
db_app = typer.Typer(no_args_is_help=True, help="The metadata database.")
app.add_typer(token_app, name="token")
app.add_typer(db_app, name="db")

DataOpt = Annotated[Path | None, typer.Option("--data", help="data folder (MEMVAULT_DATA_DIR)")]


def _settings(data: Path | None, **flags: Any) -> Settings:
    given: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    if data is not None:
        given["data_dir"] = data
    try:
        return Settings(**given)
    except ValueError as exc:
        typer.echo(f"memvault: bad settings: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def serve(
    data: DataOpt = None,
    host: Annotated[str | None, typer.Option(help="listen address (MEMVAULT_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="listen port (MEMVAULT_PORT)")] = None,
) -> None:
    """Run the HTTP server (embedded default: SQLite + files under the data folder)."""
    from memvault.http import server
    from memvault.http.app import create_app

    settings = _settings(data, host=host, port=port)
    server.run(create_app(settings), settings)


@app.command()
def worker(
    data: DataOpt = None,
    processes: Annotated[int | None, typer.Option(
        help="derivative worker processes (MEMVAULT_DERIVATIVE_WORKERS; default: cores)")] = None,
) -> None:
    """Run background work alone: derivative jobs and the session reaper (for scale-out)."""
    from memvault.clock import SystemClock
    from memvault.worker import run_worker

    settings = _settings(data, derivative_workers=processes)
    if settings.derivative_workers < 1:
        typer.echo("memvault: a worker needs at least one process (--processes N)", err=True)
        raise typer.Exit(2)
    asyncio.run(run_worker(settings, SystemClock()))


@token_app.command("create")
def token_create(
    name: str,
    data: DataOpt = None,
    admin: Annotated[bool, typer.Option(help="make the principal an administrator")] = False,
) -> None:
    """Create a principal NAME and print its bearer token (shown only this once)."""
    from memvault.clock import SystemClock
    from memvault.errors import MemvaultError
    from memvault.http.app import open_services

    settings = _settings(data)

    async def run() -> str:
        db, services = await open_services(settings, SystemClock())
        try:
            _, token = await services.auth.create_principal(name, is_admin=admin)
            return token
        finally:
            await db.dispose()

    try:
        token = asyncio.run(run())
    except MemvaultError as exc:
        typer.echo(f"memvault: {exc.detail}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(token)


@db_app.command("upgrade")
def db_upgrade(data: DataOpt = None) -> None:
    """Apply pending schema migrations."""
    from memvault.metadata.migrate import upgrade

    settings = _settings(data)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(upgrade(settings.resolved_database_url))
    typer.echo("schema is current")


def main() -> None:
    app()
