"""``login``, ``capsule create|list``, ``ls``, ``get``, ``sessions``, ``admin sessions``."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from memvault.client import (
    Asset,
    AsyncClient,
    BadResponse,
    Conflict,
    Memory,
    MemvaultError,
    NotFound,
    RetryPolicy,
    Session,
)
from memvault.client import Progress as Step
from memvault.client.download import target_path
from memvault.client.lanes import DERIVED_ROLES
from memvault.commands import config, output
from memvault.commands.messages import local_code, sentence
from memvault.filedigest import file_sha256

USAGE, FAILED, INTERRUPTED = 2, 1, 130
ROLES = ("original", *DERIVED_ROLES)


QUICK = RetryPolicy(attempts=3, max_wait=10.0)
"""Listing and the like: a server that is down is said so within seconds."""
PATIENT = RetryPolicy()
"""Transfers: ride out a network blip or a server restart (minutes), saying so meanwhile."""


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run``, on uvloop when it is installed (it comes with ``uvicorn[standard]``):
    an upload then costs the client about a quarter less CPU (asyncio's transport copies each
    chunk into its write buffer; measured 1.35 → 1.00 CPU-s for 512 MiB at parallel 4).

    Ctrl-C cancels ``main``, which ends its requests and keeps what resumes them (raised here
    as ``KeyboardInterrupt``). A second Ctrl-C during that clean-up quits at once (exit 130):
    asyncio's own handler would raise ``KeyboardInterrupt`` inside whatever callback the loop
    was running and print its traceback. Nothing is lost by it: resume records are written
    by atomic rename, and the server keeps every chunk it acknowledged."""
    interrupts = _Interrupts()

    async def guarded() -> int:
        interrupts.task = asyncio.current_task()
        return await main

    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    previous = signal.getsignal(signal.SIGINT)
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        signal.signal(signal.SIGINT, interrupts)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            interrupts.loop = runner.get_loop()
            try:
                return runner.run(guarded())
            except asyncio.CancelledError:
                if interrupts.count:
                    raise KeyboardInterrupt from None
                raise
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


class _Interrupts:
    """The SIGINT handler of ``run_loop``: the first press cancels the command, the next
    one ends the process."""

    def __init__(self) -> None:
        self.count = 0
        self.task: asyncio.Task[int] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def __call__(self, signum: int, frame: object) -> None:
        self.count += 1
        if self.task is None:
            raise KeyboardInterrupt  # the command has not started: nothing to end
        if self.count == 1 and not self.task.done():
            assert self.loop is not None
            self.task.cancel()
            self.loop.call_soon_threadsafe(lambda: None)  # wake the loop up
            return
        # Pressed again during the clean-up, or once while the loop shuts down: a
        # KeyboardInterrupt now would land inside whatever callback the loop is running.
        again = " again — quitting now" if self.count > 1 else ""
        os.write(2, f"memvault: interrupted{again}; run the same command again to "
                    "resume\n".encode())
        os._exit(INTERRUPTED)


class _Retries(logging.Handler):
    """Shows the SDK's retries on stderr, so a long wait is never silent."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("retrying"):
            output.err.print(f"memvault: {record.getMessage()}", markup=False, style="dim")


def fail(message: str, *, code: str, detail: str | None = None, as_json: bool,
         status: int = FAILED) -> int:
    """A failure of the whole command: one sentence on stderr and, with ``--json``, a
    document on stdout too (``{"error": {code, detail, message}}``), so a script always
    has JSON to read; returns ``status``."""
    output.err.print(f"memvault: {message}", markup=False)
    if as_json:
        output.print_json({"error": {"code": code, "detail": detail or message,
                                     "message": message}})
    return status


def run(work: Callable[[AsyncClient], Awaitable[int]], *, patient: bool = False,
        as_json: bool = False) -> int:
    """Run one command against the configured server; its exit code.

    A failure of the whole command is printed as one sentence on stderr (exit 1), and with
    ``as_json`` as a document on stdout too (``fail``); no login is a usage error (exit 2);
    Ctrl-C stops it cleanly (exit 130).
    """
    try:
        login = config.load()
    except config.NotLoggedIn as exc:
        return fail(str(exc), code="not_logged_in", as_json=as_json, status=USAGE)
    if patient:
        sdk_log = logging.getLogger("memvault.client")
        sdk_log.setLevel(logging.INFO)
        sdk_log.addHandler(_Retries())

    async def main() -> int:
        async with AsyncClient(login.url, login.token, retry=QUICK) as mv:
            if patient:
                # A server that is down or mistyped at the start is said so within seconds;
                # once it has answered, a transfer rides out minutes of trouble.
                await _answers(mv)
                mv.api.retry = PATIENT
            return await work(mv)

    try:
        return run_loop(main())
    except KeyboardInterrupt:
        return fail("interrupted", code="interrupted", as_json=as_json, status=INTERRUPTED)
    except MemvaultError as exc:
        return fail(sentence(exc, url=login.url), code=exc.code, detail=exc.detail,
                    as_json=as_json)
    except OSError as exc:  # a local file or folder: cannot write, does not exist, ...
        return fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
                    code=local_code(exc), as_json=as_json)


async def _answers(mv: AsyncClient) -> None:
    """Raise ``ConnectionFailed`` (after the quick policy's retries) unless the server, or a
    proxy before it, answers; a proxy passing only ``/v1`` answers 404, which will do."""
    try:
        await mv.api.call("GET", "/healthz")
    except NotFound:
        pass
    except BadResponse as exc:
        if exc.http_status >= 500:
            raise


def login(url: str, token: str) -> int:
    if not url.startswith(("http://", "https://")):
        output.err.print(f"memvault: {url!r} is not a URL — give the server as "
                         "http://HOST:PORT or https://HOST", markup=False)
        return USAGE

    async def check() -> int:
        async with AsyncClient(url, token, retry=QUICK) as mv:
            capsules = await mv.list_capsules()
        path = config.save(config.Login(url.rstrip("/"), token))
        output.out.print(f"logged in to {url.rstrip('/')} ({len(capsules)} capsules); "
                         f"saved in {path}", markup=False)
        return 0

    try:
        return run_loop(check())
    except MemvaultError as exc:
        output.err.print(f"memvault: not saved: {sentence(exc, url=url)}", markup=False)
        return FAILED


def capsule_create(name: str, as_json: bool) -> int:
    async def work(mv: AsyncClient) -> int:
        try:
            capsule = await mv.create_capsule(name)
        except Conflict as exc:
            return fail(f"you already have a capsule named {name!r} — see "
                        "`memvault capsule list`", code=exc.code, detail=exc.detail,
                        as_json=as_json)
        if as_json:
            output.print_json(capsule.model_dump())
        else:
            output.out.print(f"created capsule {capsule.name!r} ({capsule.id})", markup=False)
        return 0

    return run(work, as_json=as_json)


def capsule_list(as_json: bool) -> int:
    async def work(mv: AsyncClient) -> int:
        capsules = await mv.list_capsules()
        if as_json:
            output.print_json([c.model_dump() for c in capsules])
        elif not capsules:
            output.out.print("no capsules yet — create one with `memvault capsule create NAME`",
                             markup=False)
        else:
            output.table(["NAME", "ID", "CREATED"],
                         [[c.name, c.id, output.when(c.created_at)] for c in capsules])
        return 0

    return run(work, as_json=as_json)


def ls(capsule_name: str, as_json: bool, limit: int | None) -> int:
    async def work(mv: AsyncClient) -> int:
        capsule = await mv.capsule(capsule_name)
        memories = []
        async for memory in mv.iter_memories(capsule, page_size=min(limit or 200, 500)):
            memories.append(memory)
            if limit is not None and len(memories) >= limit:
                break
        if as_json:
            output.print_json([m.model_dump() for m in memories])
            return 0
        if not memories:
            output.out.print(f"capsule {capsule.name!r} is empty", markup=False)
            return 0
        rows = []
        for m in memories:
            original = m.assets.get("original")
            rows.append([m.id, output.when(m.created_at),
                         (original.filename or "") if original else "",
                         output.size(original.size) if original else "",
                         ",".join(r for r in ROLES
                                  if r in m.assets) or "-"])
        output.table(["MEMORY", "CREATED", "FILE", "SIZE", "ASSETS"], rows)
        return 0

    return run(work, as_json=as_json)


def get(memory_id: str, role: str, dest: str | None, *, force: bool, as_json: bool) -> int:
    """Download one asset. An existing file is never replaced without ``force``: one with the
    asset's bytes already is reported and kept; one with other bytes (another memory's
    ``IMG_0001.JPG``) is an error."""
    if role not in ROLES:
        return fail(f"--role must be one of {', '.join(ROLES)}, not {role!r}",
                    code="usage", as_json=as_json, status=USAGE)
    into = Path(dest) if dest else Path.cwd()
    if dest and dest.endswith(("/", os.sep)) and not into.is_dir():
        return fail(f"{dest} is not a folder — create it first, or leave out the final / "
                    "to name a file", code="usage", as_json=as_json, status=USAGE)

    async def work(mv: AsyncClient) -> int:
        memory = await mv.get_memory(memory_id)
        asset = memory.assets.get(role)
        if asset is None:
            return fail(_no_asset(memory, role), code="not_found", as_json=as_json)
        path = target_path(into, memory, asset)
        if path.exists() and not force:
            if await asyncio.to_thread(_holds, path, asset.size, asset.sha256):
                return _got(path, asset, as_json, kept=True)
            return fail(f"{output.shown(str(path))} already exists and holds other bytes — "
                        "pass --force to replace it, or -o to write elsewhere",
                        code="exists", as_json=as_json)
        bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                       TransferSpeedColumn(), TimeRemainingColumn(), console=output.err,
                       disable=as_json or not output.err.is_terminal, transient=True)
        with bar:
            task = bar.add_task(asset.filename or role, total=asset.size)

            def progress(step: Step) -> None:
                bar.update(task, completed=step.bytes_done)

            written = await mv.download(memory, role, into, on_progress=progress)
        assert written is not None
        return _got(written, asset, as_json, kept=False)

    return run(work, patient=True, as_json=as_json)


def _no_asset(memory: Memory, role: str) -> str:
    state = memory.derivatives.get(role)
    if state == "pending":
        return f"memory {memory.id}'s {role} is still being made — try again in a moment"
    if state in ("failed", "unsupported"):
        why = f": {memory.derivatives_reason}" if memory.derivatives_reason else ""
        return f"memory {memory.id} has no {role}: its derivatives are {state}{why}"
    return (f"memory {memory.id} has no {role!r} asset (it has: "
            f"{', '.join(sorted(memory.assets)) or 'none yet'})")


def _holds(path: Path, size: int, sha256: str) -> bool:
    """Whether ``path`` is a file of exactly these bytes."""
    if not path.is_file() or path.stat().st_size != size:
        return False
    return file_sha256(path) == (size, sha256)


def _got(path: Path, asset: Asset, as_json: bool, *, kept: bool) -> int:
    if as_json:
        output.print_json({"path": str(path.absolute()), "kept": kept, **asset.model_dump()})
    else:
        done = "already there, the same bytes" if kept else "verified"
        output.out.print(f"{output.shown(str(path))} ({output.size(asset.size)}, sha256 "
                         f"{asset.sha256[:12]}… {done})", markup=False)
    return 0


def abort(session_ids: list[str], as_json: bool) -> int:
    """Abort sessions by id (e.g. one a renamed file left behind); exit 1 if any failed."""
    async def work(mv: AsyncClient) -> int:
        aborted, errors = [], []
        for session_id in dict.fromkeys(session_ids):
            try:
                await mv.abort_session(session_id)
            except MemvaultError as exc:
                errors.append({"session_id": session_id, "code": exc.code,
                               "message": sentence(exc, url=mv.url)})
                output.err.print(f"memvault: {session_id}: {sentence(exc, url=mv.url)}",
                                 markup=False)
            else:
                aborted.append(session_id)
                if not as_json:
                    output.out.print(f"aborted {session_id}; the server dropped what it had "
                                     "received", markup=False)
        if as_json:
            output.print_json({"aborted": aborted, "errors": errors})
        return FAILED if errors else 0

    return run(work, as_json=as_json)


def sessions(as_json: bool, admin: bool) -> int:
    async def work(mv: AsyncClient) -> int:
        items = await (mv.admin_sessions() if admin else mv.list_sessions())
        if as_json:
            output.print_json([s.model_dump() for s in items])
        elif not items:
            output.out.print("no upload sessions in progress", markup=False)
        else:
            output.table(
                ["SESSION", *(["OWNER"] if admin else []), "FILE", "ROLE", "RECEIVED",
                 "EXPIRES"],
                [[s.id, *([s.owner] if admin else []), s.filename, s.role, _progress(s),
                  output.when(s.expires_at)] for s in items])
        return 0

    return run(work, as_json=as_json)


def _progress(s: Session) -> str:
    share = s.bytes_received / s.size * 100 if s.size else 100.0
    return (f"{s.received_count}/{s.chunk_count} chunks, {output.size(s.bytes_received)} of "
            f"{output.size(s.size)} ({share:.0f}%)")
