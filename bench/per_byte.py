"""What each per-byte step of a chunk costs here, in CPU-seconds per GiB, one thread.

Run as ``./run bench per_byte [--repeat N]``. The steps memvault takes for every byte it
receives, each alone, over 1 GiB in the shapes the server uses (256 KiB pieces as the HTTP
layer hands them over, written in 1 MiB batches with ``pwritev``, 8 MiB chunks):

* SHA-256 (``hashlib``, OpenSSL) and CRC32C (the ``crc32c`` package) over the pieces;
* ``pwritev`` into the page cache of a new file under ``--dir`` (default: the temp dir);
* the same with ``fdatasync`` after every 8 MiB chunk, as the server does (CPU and wall).

These are the terms of the CPU budget in docs/decisions.md ("The 1.5 x target,
budgeted"). The page-cache figures move a lot between runs on a VM; ``--repeat`` shows it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import crc32c

from _common import print_table

PIECE = 256 * 1024
BATCH = 4  # pieces per pwritev: 1 MiB
CHUNK_PIECES = 32  # 8 MiB
CHUNKS = 128  # 1 GiB


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _measure(step: Callable[[], None]) -> tuple[float, float]:
    cpu, wall = _cpu(), time.perf_counter()
    step()
    return _cpu() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    pieces = [os.urandom(PIECE) for _ in range(CHUNK_PIECES)]

    def sha256() -> None:
        digest = hashlib.sha256()
        for _ in range(CHUNKS):
            for piece in pieces:
                digest.update(piece)

    def crc() -> None:
        value = 0
        for _ in range(CHUNKS):
            for piece in pieces:
                value = crc32c.crc32c(piece, value)

    def write(sync: bool) -> Callable[[], None]:
        def run() -> None:
            fd, name = tempfile.mkstemp(dir=args.dir, prefix="memvault-per-byte-")
            try:
                offset = 0
                for _ in range(CHUNKS):
                    for i in range(0, CHUNK_PIECES, BATCH):
                        offset += os.pwritev(fd, pieces[i:i + BATCH], offset)
                    if sync:
                        os.fdatasync(fd)
            finally:
                os.close(fd)
                os.unlink(name)
        return run

    steps = [("sha256", sha256), ("crc32c", crc), ("pwritev, page cache", write(False)),
             ("pwritev + fdatasync per 8 MiB", write(True))]
    rows = []
    for name, step in steps:
        for run in range(1, args.repeat + 1):
            cpu, wall = _measure(step)
            rows.append([name, run, f"{cpu:.2f}", f"{wall:.2f}", f"{CHUNKS * 8 / 1024 / wall:.2f}"])
    print_table(["step (1 GiB)", "run", "CPU s", "wall s", "GiB/s wall"], rows)
    print(f"command: ./run bench per_byte --repeat {args.repeat} --dir {args.dir}")


if __name__ == "__main__":
    main()
