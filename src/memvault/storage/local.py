"""Local-folder blob store: the embedded default.

Layout under the root::

    staging/<key>              one sparse file per upload session, written at offsets
    blobs/ab/cd/<sha256>       committed blobs, immutable, named by content
    trash/<key>.<random>       staging files on their way out
    aside/<sha256>.<t>.<rand>  blob files a collector moved aside while it drops their row

Writes use ``pwritev`` so many requests can fill one staging file at once without sharing a
file position. Commit fsyncs the file, renames it into place and fsyncs the directory, so a
blob that the metadata names survives a crash.

Dropping a staging file (abort, expiry, or a finish whose content is already stored) renames
it into ``trash/`` and unlinks it in the background: unlinking a large file whose pages were
just synced takes the file system long (0.7 s for 1 GiB here), and no request should wait
for it. Whatever a crash leaves in ``trash/`` goes with the reaper's next sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import mmap
import os
import re
import secrets
import shutil
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import structlog

from memvault.errors import InsufficientStorage, Unavailable
from memvault.filedigest import file_sha256
from memvault.hashing import Sha256State
from memvault.storage.base import (
    BlobDamaged,
    BlobMissing,
    Digest,
    Piece,
    StagedDamaged,
    StagingGone,
)
from memvault.storage.descriptor import Descriptor, opened
from memvault.storage.writeback import release_cache, start_writeback

_READ_PIECE = 1024 * 1024
_IOV_MAX = 1024
_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

log = structlog.get_logger("memvault.storage")


@contextlib.contextmanager
def out_of_space_is_typed() -> Iterator[None]:
    """A full volume (or quota, or file size limit) is the client's 507, not our 500: the
    chunk is not received, the session stays resumable, and nothing received is touched."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _NO_SPACE:
            raise
        raise InsufficientStorage(
            f"the storage volume refused the write ({os.strerror(exc.errno)}); "
            "send the chunk again once space is freed",
            limit_name="storage_space", retry_after=60,
        ) from exc


class LocalPartWriter:
    """Writes one chunk through one descriptor, which holds the lock on the chunk's range
    until it is closed: once no call on it is running (``Descriptor``)."""

    def __init__(self, fd: int, offset: int, *, release: bool) -> None:
        self._file = Descriptor(fd)
        self._start = offset
        self._offset = offset
        self._release = release
        self._closed = False

    async def write(self, pieces: Sequence[Piece], then: Digest | None = None) -> None:
        with out_of_space_is_typed():
            written = await self._file.run(self._write_sync, list(pieces), self._offset, then)
        self._offset += written

    def _write_sync(self, pieces: list[Piece], offset: int, then: Digest | None) -> int:
        written = self._pwritev_all(pieces, offset)
        if then is not None:
            then(pieces)
        return written

    def _pwritev_all(self, pieces: list[Piece], offset: int) -> int:
        total = 0
        views = [memoryview(p) for p in pieces if p]
        while views:
            n = os.pwritev(self._file.fd, views[:_IOV_MAX], offset + total)
            total += n
            # A short write leaves a tail: drop what was written and go again.
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]
        start_writeback(self._file.fd, offset, total)
        return total

    async def close(self, *, durable: bool) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if durable:
                with out_of_space_is_typed():
                    await self._file.run(self._sync_and_release)
        finally:
            self._file.close()

    def _sync_and_release(self) -> None:
        os.fdatasync(self._file.fd)
        if self._release:
            release_cache(self._file.fd, self._start, self._offset - self._start)

    async def abandon(self) -> None:
        # The bytes written stay in the sparse file, uncounted; a retry overwrites them.
        self._closed = True
        self._file.close()


class LocalBlobStore:
    """Blob store on a local (or mounted) file system."""

    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = root
        self._staging = root / "staging"
        self._blobs = root / "blobs"
        self._trash = root / "trash"
        self._aside = root / "aside"
        self._writers = root / "writers"
        for folder in (self._staging, self._blobs, self._trash, self._aside, self._writers):
            folder.mkdir(parents=True, exist_ok=True)
        self._background: set[asyncio.Task[None]] = set()
        self.writer_id = secrets.token_hex(6)
        # Held until ``close`` or the end of the process.
        self._alive = _open_locked(self._writers / self.writer_id, 0, None, create=True)
        for name in os.listdir(self._writers):
            if _WRITER_ID.match(name) and name != self.writer_id:
                _writer_gone_sync(self._writers / name)  # and swept if so

    async def close(self) -> None:
        """Let go of this store's writer lock (its claims then read as ended: call once
        nothing writes through it)."""
        if self._alive is not None:
            fd, self._alive = self._alive, None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._writers / self.writer_id)
            os.close(fd)

    async def writer_gone(self, writer_id: str) -> bool:
        """Whether the process behind ``writer_id`` has ended: its lock file can be locked
        (the kernel let go of it with the process), or is gone (swept after that, or its
        store closed). Never for this store's own id, or where the file system has no
        open-file-description locks."""
        if not _WRITER_ID.match(writer_id) or writer_id == self.writer_id or _OFD_SETLK is None:
            return False
        return await asyncio.to_thread(_writer_gone_sync, self._writers / writer_id)

    def _staged(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"bad staging key {key!r}")
        return self._staging / key

    def _blob(self, storage_key: str) -> Path:
        # Keys are produced by commit() from a validated digest; check anyway so no stored
        # value can point outside the root.
        name = storage_key.rsplit("/", 1)[-1]
        if not _SHA.match(name) or storage_key != _blob_key(name):
            raise ValueError(f"bad blob key {storage_key!r}")
        return self.root / storage_key

    async def stage(self, key: str) -> str:
        path = self._staged(key)
        fd = await asyncio.to_thread(os.open, path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        return key

    async def open_writer(
        self, key: str, offset: int, *, length: int, part: int, hashed: bool = False
    ) -> LocalPartWriter:
        path = self._staged(key)
        try:
            fd = await opened(functools.partial(_open_locked, path, offset, length))
        except FileNotFoundError as exc:
            raise StagingGone(key) from exc
        if fd is None:
            raise Unavailable("another transfer of this chunk is still writing it; send it "
                              "again in a moment", retry_after=1, part=part)
        # A chunk hashed as it streams is never read here again (unless a chunk before it is
        # sent again): its pages can go once durable. Others stay cached until the frontier
        # has read them (``_hash_sync``) or the blob is committed.
        return LocalPartWriter(fd, offset, release=hashed)

    async def read_staged(self, key: str, offset: int, length: int) -> AsyncIterator[bytes]:
        path = self._staged(key)
        try:
            fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise StagingGone(key) from exc
        try:
            async for piece in _pread_pieces(fd, offset, length):
                yield piece
        finally:
            os.close(fd)

    async def hash_staged(self, key: str, offset: int, length: int, state: Sha256State) -> None:
        await asyncio.to_thread(self._hash_sync, self._staged(key), offset, length, state)

    @staticmethod
    def _hash_sync(path: Path, offset: int, length: int, state: Sha256State) -> None:
        # One buffer per call, large so that the thread gives up the GIL rarely (pread and
        # OpenSSL release it, and getting it back from a busy event loop can take a switch
        # interval): 256 KiB pieces hashed 3-5x slower than 1 MiB under load. It is mapped
        # anonymously, so it goes back to the system when the call ends instead of staying
        # in this thread's malloc arena (RSS at 8 chunks in flight).
        buf = mmap.mmap(-1, min(_READ_PIECE, max(length, 1)))
        view = memoryview(buf)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            view.release()
            buf.close()
            raise StagingGone(path.name) from exc
        try:
            end = offset + length
            while offset < end:
                n = os.preadv(fd, [view[: min(len(buf), end - offset)]], offset)
                if n == 0:
                    raise StagedDamaged.sized(path.name, offset, end)
                state.update(view[:n])
                offset += n
            release_cache(fd, end - length, length)  # the frontier reads a range once
        finally:
            os.close(fd)
            view.release()
            buf.close()

    async def seal(self, key: str, size: int, receipts: Sequence[str | None]) -> None:
        """Nothing to do: the staging file is already one whole, readable anywhere."""

    def blob_key(self, sha256: str) -> str:
        if not _SHA.match(sha256):
            raise ValueError(f"bad sha256 {sha256!r}")
        return _blob_key(sha256)

    async def commit(self, key: str, sha256: str, size: int) -> str:
        storage_key = self.blob_key(sha256)
        target = self.root / storage_key
        doomed = await asyncio.to_thread(self._commit_sync, self._staged(key), target, size)
        if doomed is not None:
            # The content was stored already: its file may be in use, its pages are left be.
            self._unlink_later(doomed)
        else:
            # Whatever of it is still cached (chunks the frontier never had to read back)
            # goes too, after the answer: dropping a GiB of pages takes ~30 ms.
            self._later(_release_file, target, size)
        return storage_key

    def _commit_sync(self, staged: Path, target: Path, size: int) -> Path | None:
        """Make ``target`` the durable blob; returns a file left to unlink, if any.

        The staged copy, just verified against its SHA-256, always becomes the blob, also
        when one of that name is stored already (the same content committed before): that
        one may be damaged (truncated, overwritten), and keeping it would throw away the
        only good copy while the finish reported success. It goes by an atomic rename over
        it, so a reader never finds the name missing; a second link in trash/ keeps the
        rename from waiting while a large file's blocks are freed."""
        try:
            fd = os.open(staged, os.O_RDONLY)
        except FileNotFoundError:
            # A concurrent finish of this very session renamed it already, or an abort.
            self._lost_race(staged, target)
            return None
        try:
            staged_size = os.fstat(fd).st_size
            if staged_size != size:
                # The core checks every byte was received: cut short (or grown) from outside.
                raise StagedDamaged.sized(staged.name, staged_size, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        target.parent.mkdir(parents=True, exist_ok=True)
        previous = self._second_link(target)
        try:
            os.replace(staged, target)
        except FileNotFoundError:
            self._lost_race(staged, target)
        _fsync_dir(target.parent)
        return previous

    def _trashed(self, path: Path) -> Path:
        """A fresh name in trash/ for ``path`` (the sweep unlinks what a crash leaves)."""
        return self._trash / f"{path.name}.{secrets.token_hex(4)}"

    def _second_link(self, path: Path) -> Path | None:
        """A link to ``path`` in trash/ (None if there is no such file, or the link cannot
        be made: then the rename over it frees its blocks itself)."""
        doomed = self._trashed(path)
        try:
            os.link(path, doomed)
        except OSError:
            return None
        return doomed

    @staticmethod
    def _lost_race(staged: Path, target: Path) -> None:
        """The staging file vanished under us: a concurrent commit, or an abort/expiry."""
        if not target.exists():
            raise StagingGone(staged.name)
        _fsync_dir(target.parent)

    async def discard(self, key: str) -> None:
        doomed = await asyncio.to_thread(self._throw_away, self._staged(key))
        if doomed is not None:
            self._unlink_later(doomed)

    async def delete_blob(self, storage_key: str,
                          confirm: Callable[[], Awaitable[bool]]) -> bool:
        """The file is moved to ``aside/`` (named with the time, for the sweep), so that no
        one reads or reuses it while ``confirm`` decides."""
        path = self._blob(storage_key)
        aside = self._aside / f"{path.name}.{int(time.time())}.{secrets.token_hex(4)}"
        moved = await asyncio.to_thread(_move, path, aside)
        try:
            confirmed = await confirm()
        except BaseException:
            if moved:
                await asyncio.to_thread(_put_back, aside, path)
            raise
        if moved:
            if confirmed:
                # Through trash/ (a rename), whose sweep deletes what a crash or a failed
                # unlink leaves: a file left in aside/ would be put back, with no row.
                doomed = await asyncio.to_thread(self._throw_away, aside)
                if doomed is not None:
                    self._unlink_later(doomed)
            else:
                await asyncio.to_thread(_put_back, aside, path)
        return confirmed

    async def blob_files(self) -> AsyncIterator[list[tuple[str, int]]]:
        """One batch per ``blobs/ab/`` folder (1/256 of the contents)."""
        tops = await asyncio.to_thread(_subfolders, self._blobs)
        for top in tops:
            batch = await asyncio.to_thread(_blob_files_under, top)
            if batch:
                yield batch

    async def missing_blobs(self, storage_keys: Sequence[str]) -> list[str]:
        """Not at their place, nor set aside by a collector (which puts them back)."""
        def missing() -> list[str]:
            gone = [k for k in storage_keys if not self._blob(k).exists()]
            if not gone:
                return gone
            aside = {name.partition(".")[0] for name in os.listdir(self._aside)}
            return [k for k in gone if self._blob(k).name not in aside]

        return await asyncio.to_thread(missing)

    async def blob_sizes(self, storage_keys: Sequence[str]) -> dict[str, int]:
        def sizes() -> dict[str, int]:
            found = {}
            for key in storage_keys:
                with contextlib.suppress(FileNotFoundError):
                    found[key] = os.stat(self._blob(key)).st_size
            return found

        return await asyncio.to_thread(sizes)

    async def hash_blob(self, storage_key: str) -> tuple[int, str]:
        path = self._blob(storage_key)
        try:
            return await asyncio.to_thread(file_sha256, path, _READ_PIECE)
        except FileNotFoundError as exc:
            raise BlobMissing(storage_key) from exc

    def _throw_away(self, path: Path) -> Path | None:
        """Move a file into trash/ (a rename: instant); the path to unlink later, or None if
        it was gone already."""
        doomed = self._trashed(path)
        try:
            os.replace(path, doomed)
        except FileNotFoundError:
            return None
        return doomed

    def _unlink_later(self, doomed: Path) -> None:
        self._later(doomed.unlink, True)

    def _later(self, fn: Callable[..., None], *args: Any) -> None:
        task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._background.add(task)
        task.add_done_callback(self._done_later)

    def _done_later(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # An unlink that failed is left for the reaper's sweep, which empties trash/.
            log.warning("storage.background_failed", error=repr(task.exception()))

    async def drained(self) -> None:
        """Wait for the background unlinks and cache releases started so far (tests,
        shutdown)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def staged_keys(self, older_than: float) -> list[str]:
        await asyncio.to_thread(self._empty_trash)
        await asyncio.to_thread(self._return_set_aside, older_than)

        def scan() -> list[str]:
            keys = []
            with os.scandir(self._staging) as entries:
                for entry in entries:
                    try:
                        if entry.stat().st_mtime < older_than and _KEY.match(entry.name):
                            keys.append(entry.name)
                    except FileNotFoundError:
                        continue  # discarded while we looked
            return keys

        return await asyncio.to_thread(scan)

    async def read(self, storage_key: str, start: int, end: int, *,
                   size: int | None = None) -> AsyncIterator[bytes]:
        path = self._blob(storage_key)
        try:
            fd, stored = await asyncio.to_thread(_open_sized, path)
        except FileNotFoundError as exc:
            raise BlobMissing(storage_key) from exc
        try:
            # The size of the file opened (not of the path, which a collector may move):
            # a file truncated or appended to would be served cut, or with bytes that are
            # not the asset's, under a Content-Length promising the recorded size.
            if size is not None and stored != size:
                raise BlobDamaged(storage_key, stored, size, where="on disk")
            async for piece in _pread_pieces(fd, start, end - start):
                yield piece
        finally:
            os.close(fd)

    def _empty_trash(self) -> None:
        """What a crash (or a failed unlink) left in trash/; an unlink racing one of ours
        finds the file gone, which is fine."""
        with os.scandir(self._trash) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    def _return_set_aside(self, older_than: float) -> None:
        """Blob files set aside before ``older_than`` whose collector never decided (it
        crashed, or could not put one back) go back where they were, unless a copy of the
        content is there again. Never deleted here: without its row the store cannot tell an
        unused file from one a later commit uses; back in place, an unused one is a file no
        row names, which ``memvault blobs check`` registers for collection."""
        with os.scandir(self._aside) as entries:
            for entry in entries:
                sha256, _, rest = entry.name.partition(".")
                moved_at = rest.partition(".")[0]
                if not _SHA.match(sha256) or not moved_at.isdigit():
                    continue
                if int(moved_at) < older_than:
                    path = self.root / _blob_key(sha256)
                    if path.exists():
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
                    else:
                        _put_back(Path(entry.path), path)

    async def free_bytes(self) -> int | None:
        usage = await asyncio.to_thread(shutil.disk_usage, self.root)
        return usage.free

    async def check(self) -> None:
        """Raise ``OSError`` unless uploads can be staged and committed here (a share that
        is not mounted, a folder gone or read-only)."""
        def probe() -> None:
            shutil.disk_usage(self.root)
            for folder in (self._staging, self._blobs, self._trash):
                if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
                    raise OSError(errno.EACCES, "not a writable folder", str(folder))

        await asyncio.to_thread(probe)

    async def probe_write(self) -> None:
        """Write, sync and remove a 4 KiB file in staging/ (a block's worth: a full volume
        refuses it even where an empty file would still get an inode). No session owns its
        name, so one a crash leaves is thrown away by the sweep of staging areas."""
        def probe() -> None:
            path = self._staging / f"{_PROBE_PREFIX}{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                try:
                    os.write(fd, _PROBE_BYTES)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

        await asyncio.to_thread(probe)

    def blob_path(self, storage_key: str) -> Path:
        """Local-only capability: the file behind a blob (for zero-copy serving)."""
        return self._blob(storage_key)


_PROBE_PREFIX = "readyz-probe."
_PROBE_BYTES = b"\0" * 4096

_FLOCK = "hhqqi4x"  # struct flock on Linux: type, whence, start, len, pid (0 for OFD locks)
_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None)


def _open_locked(path: Path, offset: int, length: int | None, *,
                 create: bool = False) -> int | None:
    """A descriptor to write ``path``'s range through (``length`` None: the whole file,
    however long it grows), holding its lock; None if another writer holds the range. A
    staging file is opened without ``create``: a writer racing an abort must not resurrect
    it."""
    fd = os.open(path, os.O_WRONLY | (os.O_CREAT if create else 0), 0o600)
    try:
        if _lock_range(fd, offset, length):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def _lock_range(fd: int, offset: int, length: int | None) -> bool:
    """Lock ``[offset, offset+length)`` of the staging file for writing through ``fd``, until
    it is closed; False if another writer holds any of it.

    The claim in the database says who may write a chunk, but a writer that stood still for
    longer than its claim's lease (a paused process, a write stuck on the disk) does not know
    it lost it, and its late bytes would land on those of the request that took the chunk
    over, after they were hashed. An open-file-description lock (Linux) is held as long as
    the writer's descriptor, or a write still running through it, exists, in any process:
    the taker answers 503 until the old writer is gone. Where the file system has no such
    locks, the claim alone decides, as before.
    """
    if length is not None and length <= 0:
        return True
    return _try_lock(fd, offset, length or 0) is not False


def _try_lock(fd: int, offset: int, length: int) -> bool | None:
    """Take a write lock on ``[offset, offset+length)`` through ``fd`` (``length`` 0: to the
    end of the file, however long it grows); False if another descriptor holds any of it,
    None where the file system has no open-file-description locks."""
    if _OFD_SETLK is None:
        return None
    try:
        fcntl.fcntl(fd, _OFD_SETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, offset,
                                                length, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if exc.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
            return None
        raise
    return True


_WRITER_ID = re.compile(r"^[0-9a-f]{12}$")


def _writer_gone_sync(path: Path) -> bool:
    """Whether the writer whose lock file is ``path`` has ended (its lock could be taken,
    or the file is gone); a file found so is removed."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return True
    try:
        if not _try_lock(fd, 0, 0):
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return True
    finally:
        os.close(fd)


def _move(path: Path, to: Path) -> bool:
    """Rename ``path`` to ``to``; False if it was not there."""
    try:
        os.replace(path, to)
    except FileNotFoundError:
        return False
    return True


def _put_back(aside: Path, path: Path) -> None:
    """Return a blob file set aside to ``path``. A copy placed there meanwhile has the same
    content (its name is its SHA-256), so replacing it loses nothing. If that fails, the file
    stays in ``aside/`` and the sweep tries again."""
    try:
        os.replace(aside, path)
        _fsync_dir(path.parent)
    except FileNotFoundError:
        pass  # returned already (by the sweep)
    except OSError:
        log.exception("storage.put_back_failed", path=str(path), aside=str(aside))


def _subfolders(path: Path) -> list[Path]:
    with os.scandir(path) as entries:
        return sorted(Path(e.path) for e in entries if e.is_dir(follow_symlinks=False))


def _blob_files_under(top: Path) -> list[tuple[str, int]]:
    """``(sha256, size)`` of the blob files in ``top``'s ``cd/`` folders (other names are
    not blobs and are left out)."""
    found = []
    for folder in _subfolders(top):
        with os.scandir(folder) as entries:
            for entry in entries:
                if _SHA.match(entry.name) and _blob_key(entry.name) == str(
                        Path("blobs") / top.name / folder.name / entry.name):
                    with contextlib.suppress(FileNotFoundError):  # collected meanwhile
                        found.append((entry.name, entry.stat(follow_symlinks=False).st_size))
    return found


def _blob_key(sha256: str) -> str:
    return f"blobs/{sha256[:2]}/{sha256[2:4]}/{sha256}"


def _open_sized(path: Path) -> tuple[int, int]:
    """A descriptor to read ``path`` through, and the size of the file it opened."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return fd, os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        raise


async def _pread_pieces(fd: int, offset: int, length: int) -> AsyncIterator[bytes]:
    end = offset + length
    while offset < end:
        piece = await asyncio.to_thread(os.pread, fd, min(_READ_PIECE, end - offset), offset)
        if not piece:
            raise OSError(errno.EIO, f"unexpected end of file at {offset}")
        offset += len(piece)
        yield piece


def _release_file(path: Path, size: int) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return  # collected meanwhile
    try:
        release_cache(fd, 0, size)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
