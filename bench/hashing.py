"""Resumable SHA-256 backends: speed, and whether hashing in two threads runs in parallel.

Run as ``./run bench hashing``. For each backend of ``memvault.hashing`` it hashes 64 MiB in one
thread (best of 5) and 2 x 64 MiB in two threads at once: a ratio near 1.0 means the GIL is
released while hashing (the event loop keeps running), near 2.0 means it is held.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time

from _common import print_table
from memvault.hashing import Sha256State

SIZE = 64 * 1024 * 1024


def _one(data: bytes, backend: str | None) -> float:
    start = time.perf_counter()
    _hash(data, backend)
    return time.perf_counter() - start


def _hash(data: bytes, backend: str | None) -> None:
    if backend is None:
        hashlib.sha256(data)
    else:
        Sha256State(_backend=backend).update(data)


def _two(data: bytes, backend: str | None) -> float:
    threads = [threading.Thread(target=_hash, args=(data, backend)) for _ in range(2)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def main() -> None:
    data = os.urandom(SIZE)
    rows = []
    for label, backend in (("openssl (ctypes)", "openssl"), ("rehashes", "rehashes"),
                           ("hashlib (not resumable)", None)):
        one = min(_one(data, backend) for _ in range(5))
        two = min(_two(data, backend) for _ in range(3))
        rows.append([label, f"{SIZE / one / 1e9:.2f}", f"{two / one:.2f}"])
    print_table(["backend", "GB/s, one thread", "two threads / one"], rows)
    print("command: ./run bench hashing")


if __name__ == "__main__":
    main()
