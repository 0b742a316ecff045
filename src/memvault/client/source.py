"""What an upload reads: a file by path or a binary stream, its size, and its fingerprint.

The fingerprint (size, modification time, and the SHA-256 of the first and last
``FINGERPRINT_BLOCK`` bytes) tells "the same file as before" cheaply, without reading it
whole. It keys the local resume state and the idempotency key of ``begin``, so both must be
known before ``begin`` answers with the chunk size: the blocks are therefore a fixed 1 MiB,
not the server's chunk.
"""

from __future__ import annotations

import hashlib
import io
import mimetypes
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from memvault.client.errors import FileChanged

FINGERPRINT_BLOCK = 1024 * 1024

_MAGIC = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF8", "image/gif"),
    (b"%PDF-", "application/pdf"),
)
_FTYP = {b"heic": "image/heic", b"heix": "image/heic", b"mif1": "image/heif",
         b"avif": "image/avif", b"qt  ": "video/quicktime", b"isom": "video/mp4",
         b"mp41": "video/mp4", b"mp42": "video/mp4"}


def content_type(name: str, head: bytes) -> str:
    """The media type from the first bytes when they say, else from the name."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp" and head[8:12] in _FTYP:
        return _FTYP[head[8:12]]
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"


@dataclass(frozen=True)
class Fingerprint:
    size: int
    mtime_ns: int
    head_sha256: str
    tail_sha256: str
    stream: int = 0
    """For a stream, which object it is (``id``): two streams of one size with equal ends
    are told apart (within a process, the only place a stream can be found again)."""

    def digest(self) -> str:
        which = f":{self.stream}" if self.stream else ""
        return hashlib.sha256(
            f"{self.size}:{self.mtime_ns}:{self.head_sha256}:{self.tail_sha256}{which}".encode()
        ).hexdigest()


class Source:
    """Positional reads of the bytes to upload.

    A path is opened once and read with ``os.pread``; a seekable stream is read from its
    current position to its end; a stream that cannot seek is read strictly in order (it
    cannot be resumed across calls, nor re-send a chunk the server lost).
    """

    def __init__(self, obj: str | os.PathLike[str] | BinaryIO | bytes, *,
                 filename: str | None = None, size: int | None = None) -> None:
        self.path: Path | None = None
        self._fd: int | None = None
        self._stream: BinaryIO | None = None
        self._start = 0
        self._position = 0
        if isinstance(obj, bytes | bytearray | memoryview):
            obj = io.BytesIO(bytes(obj))
        if isinstance(obj, str | os.PathLike):
            self.path = Path(obj).resolve()
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(self._fd)
                raise IsADirectoryError(f"{self.path} is not a regular file")
            self.size = st.st_size
            self.mtime_ns = st.st_mtime_ns
            self.name = filename or self.path.name
            self.seekable = True
        else:
            self._stream = obj
            self.seekable = obj.seekable()
            self.mtime_ns = 0
            self.name = filename or os.path.basename(str(getattr(obj, "name", ""))) or "upload"
            if self.seekable:
                self._start = obj.tell()
                end = obj.seek(0, io.SEEK_END)
                obj.seek(self._start)
                self.size = end - self._start
            elif size is None:
                raise ValueError("a stream that cannot seek needs size=")
            else:
                self.size = size
        if size is not None and size != self.size:
            raise ValueError(f"size={size} but the source holds {self.size} bytes")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (blocking; call it off the event loop)."""
        if self._fd is not None:
            data = os.pread(self._fd, length, offset)
            while len(data) < length:
                more = os.pread(self._fd, length - len(data), offset + len(data))
                if not more:
                    break
                data += more
        else:
            assert self._stream is not None
            if self.seekable:
                self._stream.seek(self._start + offset)
            elif offset != self._position:
                raise ValueError(
                    f"this stream cannot seek: it is at byte {self._position}, not {offset}")
            data = self._stream.read(length)
            while len(data) < length:
                more = self._stream.read(length - len(data))
                if not more:
                    break
                data += more
            self._position = offset + len(data)
        if len(data) != length:
            raise FileChanged(
                f"{self.name}: expected {length} bytes at offset {offset}, read {len(data)}; "
                "the file got shorter while it was being uploaded")
        return data

    def fingerprint(self) -> Fingerprint | None:
        """None for a stream that cannot seek (reading its ends would consume it)."""
        if not self.seekable:
            return None
        block = min(FINGERPRINT_BLOCK, self.size)
        head = hashlib.sha256(self.read(0, block)).hexdigest()
        tail = hashlib.sha256(self.read(self.size - block, block)).hexdigest()
        return Fingerprint(self.size, self.mtime_ns, head, tail,
                           id(self._stream) if self._stream is not None else 0)

    def head(self, n: int = 64) -> bytes:
        return self.read(0, min(n, self.size)) if self.seekable else b""

    def check_unchanged(self) -> None:
        """Raise ``FileChanged`` if the file's size or modification time moved. (A stream
        that cannot seek is read for ``size`` bytes and no further: what follows them stays
        in it, as ``read(size)`` would leave it. Peeking for more could block on a pipe or
        socket whose writer keeps it open.)"""
        if self.path is None:
            return
        st = os.stat(self.path)
        if st.st_size != self.size:
            what = f"size {self.size} -> {st.st_size}"
        elif st.st_mtime_ns != self.mtime_ns:
            what = "same size, modified again"
        else:
            return
        raise FileChanged(
            f"{self.path} changed while it was being uploaded ({what}); upload it again "
            "once it is no longer being written")


def random_key() -> str:
    return secrets.token_hex(16)
