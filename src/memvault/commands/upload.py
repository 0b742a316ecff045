"""``memvault upload PATH... --capsule NAME``: files and folders, each as one memory.

For each file, in order: its SHA-256 (remembered per file fingerprint in the state folder, so
a second run does not read it again; forgotten when an upload finds the file changed), then
"already in the capsule?" (a memory whose original has that digest, or a file of this run
with the same bytes: skipped and reported), then ``upload_memory`` (the original, and,
unless ``--no-derivatives``, display/thumb/placeholder made here). ``--jobs`` files go at
once, each with ``--parallel`` chunks in flight. The check costs one read of each new file
before its upload; the upload itself then reads it once more (the page cache usually makes
that second read cheap), which is the price of never sending a file the capsule already has.

A folder that cannot be read and a named path that is neither a file nor a folder are
failures of the run (reported like a file that failed); a named folder with no files in it
is said so. Interrupted (Ctrl-C, a lost network), a file's upload session and its local
record are kept, so running the same command again resumes it: the SDK asks the server what
it holds and sends only the rest. Exit code: 0 when every file is uploaded or already
present, 1 when any failed (each printed with its code and cause), 2 for usage errors, 130
when interrupted.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from memvault.client import (
    AsyncClient,
    Capsule,
    ChecksumMismatch,
    FileChanged,
    MemvaultError,
    NotFound,
    UploadMemoryError,
)
from memvault.client import Progress as Step
from memvault.client.source import Source
from memvault.client.state import StateStore
from memvault.commands import output
from memvault.commands.library import FAILED, run
from memvault.commands.messages import NotARegularFile, local_code, sentence
from memvault.filedigest import file_sha256

_READ = 4 * 1024 * 1024


@dataclass
class Outcome:
    path: str
    size: int
    status: str = "pending"
    """``uploaded``, ``skipped`` (already present), ``partial`` (original stored, derivatives
    failed) or ``failed``."""
    memory_id: str | None = None
    sha256: str | None = None
    resumed_chunks: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)


def files_under(paths: list[Path], problems: list[Outcome]) -> Iterator[Path]:
    """The files named, and those inside the folders named (recursively, sorted, hidden files
    and folders left out, symbolic links to folders not followed). A folder that cannot be
    read, and a named path that is neither a file nor a folder, go into ``problems`` as
    failed outcomes; inside folders, what is not a regular file (a pipe, a socket) is left
    out."""
    def unreadable(exc: OSError) -> None:
        problems.append(_failed(Path(exc.filename or "?"), exc))

    for path in paths:
        if path.is_dir():
            for root, dirs, names in os.walk(path, onerror=unreadable):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    if not name.startswith(".") and (Path(root) / name).is_file():
                        yield Path(root) / name
        elif path.is_file():
            yield path
        elif not path.exists():
            problems.append(_failed(path, FileNotFoundError(
                errno.ENOENT, "no such file or folder (or a symbolic link to nothing, or in a "
                "loop)", str(path))))
        else:
            problems.append(_failed(path, NotARegularFile(
                errno.EINVAL, "not a regular file or a folder (a pipe, a socket or a device)",
                str(path))))


def _failed(path: Path, error: OSError) -> Outcome:
    return Outcome(str(path), 0, status="failed", errors=[_error(error, "original", "")])


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # gone since it was listed: its upload says so
        return 0


def upload(paths: list[Path], capsule_name: str, *, parallel: int, jobs: int,
           derivatives: bool, create: bool, as_json: bool) -> int:
    async def work(mv: AsyncClient) -> int:
        await mv.prune_state()  # also when every file is skipped, and no upload runs
        created = False
        try:
            capsule = await mv.capsule(capsule_name)
        except NotFound:
            if not create:
                raise
            capsule, created = await mv.capsule(capsule_name, create=True), True
        problems: list[Outcome] = []
        files: list[Path] = []
        for path in paths:
            found = [p.resolve() for p in files_under([path], problems)]
            if not found and path.is_dir() and not as_json:
                output.err.print(f"memvault: no files to upload in {_short(path)}",
                                 markup=False)
            files.extend(found)
        run_ = _Run(mv, capsule, list(dict.fromkeys(files)), parallel=parallel, jobs=jobs,
                    derivatives=derivatives, as_json=as_json, problems=problems,
                    capsule_created=created)
        return await run_.all()

    return run(work, patient=True, as_json=as_json)


class _Run:
    def __init__(self, mv: AsyncClient, capsule: Capsule, files: list[Path], *, parallel: int,
                 jobs: int, derivatives: bool, as_json: bool,
                 problems: list[Outcome] | None = None, capsule_created: bool = False) -> None:
        self.mv = mv
        self.capsule = capsule
        self.files = files
        self.parallel = parallel
        self.jobs = jobs
        self.derivatives = derivatives
        self.as_json = as_json
        self.outcomes = [Outcome(str(p), _size(p)) for p in files]
        self.problems = problems or []
        self._hash_keys: dict[Path, str] = {}
        self._claims: dict[str, asyncio.Future[str | None]] = {}
        """Per SHA-256, the upload of this run that holds it: its memory id once stored,
        None if it failed (then the next file with those bytes tries)."""
        self.bars = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), console=output.err,
            disable=as_json or not output.err.is_terminal,
            # Not when stdout goes to a file: rich would send it to the bars' terminal.
            redirect_stdout=output.out.is_terminal)
        self.total: TaskID | None = None
        self.capsule_created = capsule_created
        """Whether this run made the capsule (``--create``): the summary says so."""

    async def all(self) -> int:
        slots = asyncio.Semaphore(self.jobs)

        async def one(path: Path, outcome: Outcome) -> None:
            async with slots:
                await self._file(path, outcome)

        for problem in self.problems:
            self._fail(_short(Path(problem.path)), problem)
        with self.bars:
            self.total = self.bars.add_task(
                f"{len(self.files)} files", total=sum(o.size for o in self.outcomes))
            try:
                async with asyncio.TaskGroup() as tasks:
                    for path, outcome in zip(self.files, self.outcomes, strict=True):
                        tasks.create_task(one(path, outcome))
            except asyncio.CancelledError:
                if not self.as_json:
                    output.err.print("interrupted — run the same command again to resume; "
                                     "the server keeps what it received", markup=False)
                raise
        return self._report()

    async def _file(self, path: Path, outcome: Outcome) -> None:
        name = _short(path)
        bar = self.bars.add_task(name, total=outcome.size)
        done_before = 0

        def advance(completed: int) -> None:
            nonlocal done_before
            self.bars.update(bar, completed=completed)
            if self.total is not None:
                self.bars.advance(self.total, completed - done_before)
            done_before = completed

        def not_sent(nbytes: int) -> None:
            """Bytes this run need not send (stored before, or already on the server): out
            of the total, so its speed and time left are those of the transfer."""
            nonlocal done_before
            if self.total is not None:
                total = self.bars.tasks[self.total].total or 0
                self.bars.update(self.total, total=total - nbytes)
            done_before += nbytes

        claim: asyncio.Future[str | None] | None = None
        try:
            self.bars.update(bar, description=f"{name} (hashing)")
            outcome.sha256 = await self._sha256(path)
            while (held := self._claims.get(outcome.sha256)) is not None:
                # The same bytes as a file this run is uploading: wait for that one.
                self.bars.update(bar, description=f"{name} (same as another file)")
                memory_id = await asyncio.shield(held)
                if memory_id is not None:
                    outcome.status, outcome.memory_id = "skipped", memory_id
                    aborted = await self._discard_interrupted(path)
                    not_sent(outcome.size)
                    self._say(f"= {name}: the same as another file of this run, now in "
                              f"{self.capsule.name!r} as {memory_id}{aborted}")
                    return
            claim = self._claims[outcome.sha256] = asyncio.get_running_loop().create_future()
            present = await self.mv.find_memories(self.capsule, outcome.sha256)
            if present:
                outcome.status, outcome.memory_id = "skipped", present[0].id
                aborted = await self._discard_interrupted(path)
                not_sent(outcome.size)
                self._say(f"= {name}: already in {self.capsule.name!r} as {present[0].id}"
                          f"{aborted}")
                return
            self.bars.update(bar, description=name, completed=0)

            def progress(step: Step) -> None:
                if step.role == "original":
                    if step.phase == "begin":
                        outcome.resumed_chunks = step.chunks_done
                        not_sent(max(step.bytes_done - done_before, 0))
                    advance(step.bytes_done)

            memory = await self.mv.upload_memory(
                path, capsule=self.capsule, derivatives="auto" if self.derivatives else None,
                parallel=self.parallel, on_progress=progress, sha256=outcome.sha256)
            outcome.status, outcome.memory_id = "uploaded", memory.id
            advance(outcome.size)
            resumed = f", resumed ({outcome.resumed_chunks} chunks were already there)" \
                if outcome.resumed_chunks else ""
            assets = f"{len(memory.assets)} asset{'s' if len(memory.assets) > 1 else ''}"
            self._say(f"✓ {name} → {memory.id} ({output.size(outcome.size)}, {assets}"
                      f"{resumed})")
        except UploadMemoryError as group:
            outcome.memory_id = group.memory_id
            original_failed = False
            for error in group.exceptions:
                lane = "derivatives" if any("lane B" in n for n in
                                            getattr(error, "__notes__", [])) else "original"
                original_failed |= lane == "original"
                outcome.errors.append(_error(error, lane, self.mv.url))
            outcome.status = "failed" if original_failed else "partial"
            self._forget_hash(path, list(group.exceptions))
            self._fail(name, outcome)
        except MemvaultError as error:
            outcome.status = "failed"
            outcome.errors.append(_error(error, "original", self.mv.url))
            self._forget_hash(path, [error])
            self._fail(name, outcome)
        except OSError as error:  # unreadable, vanished, a folder turned file...
            outcome.status = "failed"
            outcome.errors.append(_error(error, "original", self.mv.url))
            self._fail(name, outcome)
        finally:
            self.bars.remove_task(bar)
            if claim is not None:
                stored = outcome.status in ("uploaded", "skipped", "partial")
                claim.set_result(outcome.memory_id if stored else None)
                if not stored and self._claims.get(outcome.sha256 or "") is claim:
                    del self._claims[outcome.sha256 or ""]

    async def _discard_interrupted(self, path: Path) -> str:
        """A file skipped as stored may have an interrupted upload of an earlier run (whose
        bytes reached the capsule meanwhile under another name, or through another run):
        abort it, so its session does not hold a place in the capsule until it expires.
        Returns what to add to the line that reports the skip."""
        if await self.mv.discard_upload(path, self.capsule):
            return "; its interrupted upload was aborted"
        return ""

    async def _sha256(self, path: Path) -> str:
        """The file's SHA-256, remembered by fingerprint so a second run need not read it."""
        source = Source(path)
        try:
            fingerprint = await asyncio.to_thread(source.fingerprint)
        finally:
            source.close()
        assert fingerprint is not None
        key = self._hash_keys[path] = StateStore.key(str(path), fingerprint.digest())
        known = self.mv.state.load_hash(key)
        if known is not None:
            return known
        digest = (await asyncio.to_thread(file_sha256, path, _READ))[1]
        self.mv.state.save_hash(key, digest)
        return digest

    def _forget_hash(self, path: Path, errors: list[BaseException]) -> None:
        """Drop the remembered SHA-256 of ``path`` when an upload found the file is not what
        it was when hashed (same size, time and ends, other bytes), so the next run reads it
        afresh instead of failing the same way for ever."""
        key = self._hash_keys.get(path)
        if key is not None and any(isinstance(e, FileChanged | ChecksumMismatch)
                                   for e in errors):
            self.mv.state.drop_hash(key)

    def _say(self, line: str) -> None:
        if self.as_json:
            return
        # Results go to stdout; while the bars are drawn on the same terminal, above them
        # (through the bars' console). A log of `upload ... > log` keeps every line.
        console = (output.out if self.bars.disable or not output.out.is_terminal
                   else self.bars.console)
        console.print(line, markup=False)

    def _fail(self, name: str, outcome: Outcome) -> None:
        if self.as_json:
            return
        head = ("✗" if outcome.status == "failed" else "!") + f" {name}: "
        if outcome.status == "partial":
            head += f"stored as {outcome.memory_id}, but its derivatives failed (the server " \
                    "makes them instead): "
        for e in outcome.errors:
            (output.err if self.bars.disable else self.bars.console).print(
                head + e["message"], markup=False)

    def _report(self) -> int:
        self.outcomes = self.problems + self.outcomes
        counts = {s: sum(o.status == s for o in self.outcomes)
                  for s in ("uploaded", "skipped", "partial", "failed")}
        if self.as_json:
            output.print_json({
                "capsule": self.capsule.model_dump(),
                "capsule_created": self.capsule_created,
                "files": [o.__dict__ for o in self.outcomes],
                **counts,
            })
        else:
            parts = [f"{counts['uploaded']} uploaded",
                     f"{counts['skipped']} already present"]
            if counts["partial"]:
                parts.append(f"{counts['partial']} without derivatives")
            parts.append(f"{counts['failed']} failed")
            made = ", created by this run" if self.capsule_created else ""
            output.out.print(", ".join(parts) + f" (capsule {self.capsule.name!r}{made})",
                             markup=False)
        return FAILED if counts["failed"] or counts["partial"] else 0


def _error(error: BaseException, lane: str, url: str) -> dict[str, str]:
    code = error.code if isinstance(error, MemvaultError) else local_code(error)
    detail = error.detail if isinstance(error, MemvaultError) else str(error)
    return {"lane": lane, "code": code, "detail": detail, "message": sentence(error, url=url)}


def _short(path: Path) -> str:
    """The path as printed: relative to the working folder when inside it, control
    characters escaped (``output.shown``)."""
    try:
        return output.shown(str(path.relative_to(Path.cwd())))
    except ValueError:
        return output.shown(str(path))
