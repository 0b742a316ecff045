"""Helpers shared by the benchmark scripts in ``bench/``.

The scripts are run as files (``python bench/NAME.py``), so ``bench/`` is on ``sys.path`` and
they import this module as ``_common``. Everything here talks to loopback addresses only.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import ipaddress
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO, Self
from urllib.parse import urlsplit

import httpx
import psutil

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: Size of the random block that ``make_file`` repeats (stamped differently each time).
BLOCK_SIZE = 16 * MiB
#: ``make_file`` stamps one 8-byte counter into every STAMP_STRIDE bytes of a block.
STAMP_STRIDE = 512

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}


# --- sizes, numbers, tables ------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Parse ``"256M"``, ``"1G"``, ``"1GiB"``, ``"512k"`` or ``"1048576"`` into bytes.

    Units are binary: ``M`` means MiB, ``G`` means GiB.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 256M, 1G, 1.5GiB)")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[unit.lower()])


def format_size(size: int) -> str:
    """``268435456`` -> ``"256 MiB"``; exact binary units when they fit, else bytes."""
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


def mb_per_s(size: int, seconds: float) -> float:
    """Throughput in MB/s, decimal (10**6 bytes per second)."""
    return size / seconds / 1e6


def median(xs: Iterable[float]) -> float:
    """Median of a non-empty collection of numbers."""
    values = list(xs)
    if not values:
        raise ValueError("median of an empty sequence")
    return float(statistics.median(values))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render rows as an aligned plain-text table.

    Floats are shown with one decimal; pass a preformatted string (``f"{x:.2f}"``) for other
    precisions. Columns whose cells all read as numbers are right-aligned, others left-aligned.
    """

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.1f}"
        return str(value)

    def is_number(text: str) -> bool:
        try:
            float(text)
        except ValueError:
            return False
        return True

    text_rows = [[cell(v) for v in row] for row in rows]
    for row in text_rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, table has {len(headers)} columns")
    numeric = [
        bool(text_rows) and all(is_number(row[i]) for row in text_rows) for i in range(len(headers))
    ]
    widths = [max([len(h), *(len(r[i]) for r in text_rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out.extend(line(r) for r in text_rows)
    return "\n".join(out)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print ``format_table(headers, rows)`` followed by a blank line."""
    print(format_table(headers, rows), end="\n\n", flush=True)


# --- files -------------------------------------------------------------------------------------


def make_file(path: Path, size: int, seed: int = 0) -> None:
    """Write ``size`` bytes of pseudo-random data to ``path``, streaming.

    One 16 MiB random block (from ``seed``) is generated once; each copy written gets an 8-byte
    counter (block index, offset, seed) stamped every 512 bytes, so no two 512-byte-aligned
    sectors of the file are equal and a per-chunk compressor finds nothing to compress. Memory
    use is one block (~16 MiB) whatever ``size`` is. The file is fsynced before returning, so
    its writeback does not run during a timed upload; speed is disk-bound.
    """
    if size < 0:
        raise ValueError("size must be >= 0")
    block = bytearray(random.Random(seed).randbytes(BLOCK_SIZE))
    words = memoryview(block).cast("Q")
    stride = STAMP_STRIDE // words.itemsize
    stamps_per_block = len(words) // stride
    salt = (seed & 0xFFFF) << 48
    with open(path, "wb", buffering=0) as out:
        written = 0
        index = 0
        while written < size:
            first = salt | (index << 24)
            stamps = array.array("Q", range(first, first + stamps_per_block))
            words[::stride] = memoryview(stamps)
            n = min(BLOCK_SIZE, size - written)
            view = memoryview(block)[:n]
            while view:
                view = view[out.write(view) :]
            written += n
            index += 1
        # On disk before any timed upload reads it, so its writeback does not compete.
        os.fsync(out.fileno())
    words.release()


def durable_write_seconds(source: Path, size: int, target: Path, writers: int = 4,
                          chunk: int = 8 * MiB) -> float:
    """Seconds to make ``size`` bytes of ``source`` durable in ``target`` the way an upload
    server that syncs every chunk must: ``writers`` threads take 8 MiB chunks in turn, each
    ``pwrite`` at its offset followed by ``fdatasync``. No HTTP, no hashing: the disk's
    ceiling for such a server in this hour. The source should be in the page cache already.
    ``target`` is removed afterwards."""
    next_index = iter(range((size + chunk - 1) // chunk))
    lock = threading.Lock()
    src = os.open(source, os.O_RDONLY)
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def writer() -> None:
        buffer = bytearray(chunk)
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            offset = index * chunk
            view = memoryview(buffer)[: min(chunk, size - offset)]
            if os.preadv(src, [view], offset) != len(view):
                raise OSError(f"{source}: short read at {offset}")
            done = 0
            while done < len(view):
                done += os.pwrite(out, view[done:], offset + done)
            os.fdatasync(out)

    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(writers) as pool:
            for future in [pool.submit(writer) for _ in range(writers)]:
                future.result()
        seconds = time.perf_counter() - started
        os.posix_fadvise(out, 0, size, os.POSIX_FADV_DONTNEED)  # leave the cache as it was
    finally:
        os.close(src)
        os.close(out)
        target.unlink(missing_ok=True)
    return seconds


def sha256_file(path: Path, bufsize: int = 4 * MiB) -> str:
    """Hex SHA-256 of a file, read in ``bufsize`` pieces."""
    digest = hashlib.sha256()
    buf = bytearray(bufsize)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def same_file_content(expected: Path, actual: Path) -> None:
    """Raise ``AssertionError`` unless the two files have the same size and SHA-256."""
    if not actual.is_file():
        raise AssertionError(f"stored file missing: {actual}")
    want, got = expected.stat().st_size, actual.stat().st_size
    if want != got:
        raise AssertionError(f"{actual}: size {got}, expected {want}")
    want_hash, got_hash = sha256_file(expected), sha256_file(actual)
    if want_hash != got_hash:
        raise AssertionError(f"{actual}: sha256 {got_hash}, expected {want_hash}")


# --- network -----------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the usual bind-to-0 race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def require_loopback(url: str) -> None:
    """Raise ``ValueError`` unless ``url`` points at a loopback address (127.0.0.0/8, ::1)."""
    host = urlsplit(url).hostname
    if host == "localhost":
        return
    try:
        loopback = host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"benchmarks only talk to loopback addresses, not {url!r}")


# --- server processes --------------------------------------------------------------------------


def _proc_status_kib(pid: int, field: str) -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``, ...) of ``/proc/PID/status``."""
    prefix = f"{field}:"
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(prefix):
                return int(line.split()[1])
    raise LookupError(f"{field} not in /proc/{pid}/status")


class ServerProcess:
    """A server started as a subprocess, for benchmarking.

    ``start()`` launches ``argv`` (in its own session, stdout and stderr captured to a temporary
    file), then polls ``ready_url`` until it answers any HTTP response. ``pid`` is the process
    that serves: the one started, or with ``follow_child=True`` its single child process (for a
    supervisor such as granian that forks one worker). Use it as a context manager; leaving the
    block stops the server: SIGTERM, then SIGKILL to its process group after ``stop_timeout``.

    ``env`` entries are added to a copy of ``os.environ``.
    """

    def __init__(
        self,
        argv: Sequence[str],
        ready_url: str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        follow_child: bool = False,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        require_loopback(ready_url)
        self.argv = list(argv)
        self.ready_url = ready_url
        self.env = dict(env or {})
        self.cwd = cwd
        self.follow_child = follow_child
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._serving_pid: int | None = None
        self.returncode: int | None = None

    # lifecycle

    def start(self) -> Self:
        """Start the process and wait until ``ready_url`` answers. No-op if already started."""
        if self._proc is not None:
            return self
        # Held open for the server's lifetime; stop() closes it.
        self._log = tempfile.TemporaryFile(prefix="bench-server-", suffix=".log")  # noqa: SIM115
        self._proc = subprocess.Popen(
            self.argv,
            env={**os.environ, **self.env},
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready()
            self._serving_pid = self._find_serving_pid()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"server exited with {self._proc.returncode} before answering "
                        f"{self.ready_url}; its output:\n{self.log_tail()}"
                    )
                try:
                    client.get(self.ready_url)
                except httpx.TransportError:
                    pass
                else:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.ready_url} did not answer within {self.startup_timeout}s; "
                        f"server output:\n{self.log_tail()}"
                    )
                time.sleep(0.05)

    def _find_serving_pid(self) -> int:
        assert self._proc is not None
        if not self.follow_child:
            return self._proc.pid
        children = psutil.Process(self._proc.pid).children(recursive=False)
        if len(children) != 1:
            pids = [c.pid for c in children]
            raise RuntimeError(
                f"follow_child needs exactly one child of {self._proc.pid}, found {pids}"
            )
        child_pid: int = children[0].pid
        return child_pid

    def stop(self) -> int | None:
        """Stop the server (SIGTERM, then SIGKILL to its process group); return its exit code."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            # A supervisor may exit and leave a worker behind: the group is ours, clear it.
            child = self._serving_pid
            if child is not None and child != proc.pid and psutil.pid_exists(child):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            self.returncode = proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.returncode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # inspection

    @property
    def pid(self) -> int:
        """PID of the process that serves requests (see ``follow_child``)."""
        if self._serving_pid is None:
            raise RuntimeError("server not started")
        return self._serving_pid

    @property
    def root_pid(self) -> int:
        """PID of the process that was started."""
        if self._proc is None:
            raise RuntimeError("server not started")
        return self._proc.pid

    def rss_kib(self) -> int:
        """Current resident set size of the serving process (VmRSS), KiB."""
        return _proc_status_kib(self.pid, "VmRSS")

    def hwm_kib(self) -> int:
        """Peak resident set size of the serving process (VmHWM), KiB."""
        return _proc_status_kib(self.pid, "VmHWM")

    def cpu_seconds(self) -> float:
        """User plus system CPU time used so far by the serving process, seconds."""
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def reset_hwm(self) -> bool:
        """Reset VmHWM to the current RSS (``echo 5 > /proc/PID/clear_refs``).

        Returns False where the kernel or the sandbox does not allow it; VmHWM then keeps
        counting from process start.
        """
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
        except OSError:
            return False
        return True

    def log_tail(self, max_bytes: int = 4000) -> str:
        """The last ``max_bytes`` of the server's combined stdout and stderr."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0, os.SEEK_END)
        end = self._log.tell()
        self._log.seek(max(0, end - max_bytes))
        return self._log.read().decode("utf-8", "replace")


def python_argv(*args: str) -> list[str]:
    """``[sys.executable, *args]``: run something with the interpreter running the benchmark."""
    return [sys.executable, *args]
