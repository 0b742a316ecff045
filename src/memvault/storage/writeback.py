"""Start writing a range to disk as soon as it is written (Linux ``sync_file_range``).

A chunk is acknowledged only after ``fdatasync``; without this, all of its bytes would start
going to disk at that moment and the request would wait for the whole chunk. Kicking off
writeback batch by batch while the rest of the body is still arriving leaves the final sync
little to wait for. Where the call does not exist (not Linux) this does nothing, and the
final fdatasync alone keeps the guarantee.
"""

from __future__ import annotations

import ctypes
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
