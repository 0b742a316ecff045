"""The SHA-256 of a whole file, for the server (``blobs check --verify``) and the CLI (a
file's digest before its upload, a download target already holding the bytes) alike.

A module of its own, with nothing but the standard library: ``memvault.hashing`` loads
libcrypto for resumable hash states, which neither of these needs.
"""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike[str], piece: int = 1024 * 1024) -> tuple[int, str]:
    """Bytes read and SHA-256 (hex) of a whole file, read once through one reused buffer:
    memory stays flat whatever its size. ``FileNotFoundError`` and friends pass through."""
    digest = hashlib.sha256()
    view = memoryview(bytearray(piece))
    total = 0
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        while n := os.readv(fd, [view]):
            digest.update(view[:n])
            total += n
    finally:
        os.close(fd)
    return total, digest.hexdigest()
