"""Page-cache hints for staged chunks: start writing early, let go once durable (Linux).

A chunk is acknowledged only after ``fdatasync``; without ``start_writeback``, all of its bytes
would start going to disk at that moment and the request would wait for the whole chunk.
Kicking off writeback (``sync_file_range``) batch by batch while the rest of the body is still
arriving leaves the final sync little to wait for.

Once a chunk is durable its pages are clean, and an upload's bytes are written once and read
rarely (a hash catch-up, a derivative job, a download much later). ``release_cache`` drops them
(``posix_fadvise(DONTNEED)``), so a multi-GB upload does not push what the machine does read
often (the database, thumbnails) out of the cache, and the next chunk's write reuses memory the
system already has in hand instead of claiming pages it has never touched (docs/decisions.md,
"Dropping a chunk's pages once durable"). Both are hints: where a call does not exist (not
Linux) they do nothing, and the final fdatasync alone keeps the guarantee.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

_SYNC_FILE_RANGE_WRITE = 2


def _load() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to begin writing ``[offset, offset+length)`` out; do not wait."""
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # a hint: errors ignored


def release_cache(fd: int, offset: int, length: int) -> None:
    """Drop the cached pages of ``[offset, offset+length)``, which must already be durable
    (dirty pages would only be queued for writeback, not dropped)."""
    if hasattr(os, "posix_fadvise") and length > 0:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
