"""Upload benchmark: memvault (embedded: SQLite + local folder) on 127.0.0.1, in one run.

Run as ``./run bench upload [options]`` (that is ``.venv/bin/python bench/upload.py``). It starts
every server itself on 127.0.0.1, writes its test files to a temporary directory under /tmp
(removed at the end) and prints figures; it asserts nothing about speed. What it measures:

1. memvault as ``memvault serve`` runs it (uvicorn + httptools + uvloop, default settings:
   8 MiB chunks, fsync per chunk) for each ``--sizes`` file, with 1, 4 and 8 chunks in
   flight (8 for every size, so that the peak RSS at 8 can be compared across sizes): MB/s
   for begin -> every chunk -> finish, the latency of
   begin, of each chunk PUT and of finish, the server's and the client's CPU, and the server's
   memory: idle RSS (VmRSS after start, before any upload) and peak RSS (VmHWM, reset before
   each upload), so "peak - idle" is what an upload costs.
2. tuspyserver (``tus_peer.py``: uvicorn + httptools, tuspy client, one 8 MiB PATCH at a time,
   no fsync) on the 1 GiB file, side by side with memvault.
3. memvault's ASGI server: the same 1 GiB x 4-in-flight upload under uvicorn+httptools (what
   ``memvault serve`` does) and under granian (``--interface asgi --factory``, one worker).

The client is one persistent ``httpx.Client`` (HTTP/1.1 keep-alive, a connection per request
in flight) driven by a thread pool; each chunk is read with ``os.pread`` when it is sent, so at
most one chunk per request in flight is in memory. The file's SHA-256 is computed before the
timed region and sent with begin and finish. Every upload is verified: finish's SHA-256 must be
the file's; the first upload of each size is also read back through the API and hashed.

memvault stores blobs by content, so uploading the same bytes twice would skip work. Each
upload therefore stamps a fresh 8-byte counter over the file's last 8 bytes first (its SHA-256
follows from a saved prefix state, so nothing is re-read), and the blob is deleted from the
server's data folder once verified, to keep disk use to about one file per size.

Examples::

    ./run bench upload                       # the full run (1 GiB and 4 GiB, 3 repeats)
    ./run bench upload --quick               # smoke run: 256 MiB, 1 repeat
    ./run bench upload --sizes 1G --repeat 5 --skip-tus
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shlex
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import psutil

from _common import (
    GiB,
    MiB,
    ServerProcess,
    durable_write_seconds,
    format_size,
    free_port,
    make_file,
    mb_per_s,
    median,
    parse_size,
    print_table,
    python_argv,
    require_loopback,
)
from tus_peer import bypass_proxies_for_loopback, run_tuspyserver, tus_endpoint, upload_with_tuspy

DEFAULT_SIZES = "1G,4G"
QUICK_SIZE = "256M"
#: Chunks in flight, for every size.
IN_FLIGHT = (1, 4, 8)
#: The size the tus and ASGI-server comparisons use when it is among --sizes.
COMPARE_SIZE = 1 * GiB
COMPARE_IN_FLIGHT = 4
TAIL = 8  # bytes stamped at the end of the file before each upload
READ_PIECE = 4 * MiB


class UploadError(RuntimeError):
    """An API call failed or an upload did not verify."""


# --- the source file -----------------------------------------------------------------------------


class Source:
    """The file to upload; ``next_variant()`` makes its content (and SHA-256) new each time."""

    _counter = 0  # shared by all sources of a run, so no two uploads carry the same bytes

    def __init__(self, path: Path, size: int) -> None:
        if size < 2 * TAIL:
            raise ValueError("files must be at least 16 bytes")
        self.path = path
        self.size = size
        self.fd = os.open(path, os.O_RDWR)
        self._prefix = hashlib.sha256()
        buf = bytearray(READ_PIECE)
        view = memoryview(buf)
        offset, end = 0, size - TAIL
        while offset < end:
            n = os.preadv(self.fd, [view[: min(READ_PIECE, end - offset)]], offset)
            if n <= 0:
                raise OSError(f"{path}: short read at {offset}")
            self._prefix.update(view[:n])
            offset += n
        self.sha256 = ""
        self.next_variant()

    def next_variant(self) -> str:
        """Stamp a new counter into the last 8 bytes; return (and keep) the new SHA-256."""
        Source._counter += 1
        tail = struct.pack(">Q", (0xB3 << 56) | Source._counter)
        if os.pwrite(self.fd, tail, self.size - TAIL) != TAIL:
            raise OSError(f"{self.path}: short write")
        os.fsync(self.fd)  # one dirty page; not left for writeback during a timed upload
        digest = self._prefix.copy()
        digest.update(tail)
        self.sha256 = digest.hexdigest()
        return self.sha256

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise OSError(f"{self.path}: short read at {offset}")
        return data

    def close(self) -> None:
        os.close(self.fd)


# --- the memvault client -------------------------------------------------------------------------


@dataclass
class UploadTiming:
    """One upload, as the client saw it, plus the server's resources around it."""

    seconds: float  # begin -> finish answered
    begin_s: float
    finish_s: float
    chunk_s: list[float]  # each chunk PUT, request sent -> response read
    client_cpu: float
    memory_id: str
    sha256: str
    server_cpu: float = 0.0
    rss_before_kib: int = 0
    hwm_kib: int = 0
    rss_after_kib: int = 0
    fds_after: int = 0


def _check(response: httpx.Response, what: str, *ok: int) -> dict[str, Any]:
    if response.status_code not in ok:
        raise UploadError(f"{what}: HTTP {response.status_code}: {response.text[:2000]}")
    body: dict[str, Any] = response.json()
    return body


class Api:
    """memvault's v1 API over one persistent HTTP/1.1 client with ``pool`` connections."""

    def __init__(self, base_url: str, token: str, pool: int,
                 transport: httpx.BaseTransport | None = None) -> None:
        require_loopback(base_url)
        self.http = httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(600.0, connect=10.0),
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
            trust_env=False,
            transport=transport,  # e.g. several servers behind one base URL
        )

    def close(self) -> None:
        self.http.close()

    def capsule(self) -> str:
        r = self.http.post("/v1/capsules", json={"name": f"bench-{uuid.uuid4().hex[:12]}"})
        return str(_check(r, "create capsule", 201)["id"])

    def upload(
        self, capsule_id: str, src: Source, in_flight: int, pool: ThreadPoolExecutor
    ) -> UploadTiming:
        """begin -> every chunk (``in_flight`` at a time, read at send time) -> finish."""
        sha = src.sha256
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        session = _check(
            self.http.post(
                "/v1/uploads",
                json={
                    "capsule_id": capsule_id,
                    "filename": src.path.name,
                    "content_type": "application/octet-stream",
                    "size": src.size,
                    "sha256": sha,
                    "idempotency_key": uuid.uuid4().hex,
                },
            ),
            "begin",
            201,
        )
        t1 = time.perf_counter()
        sid, chunk_size, count = session["id"], session["chunk_size"], session["chunk_count"]
        latencies = self._send_chunks(sid, src, chunk_size, count, in_flight, pool)
        t2 = time.perf_counter()
        done = _check(
            self.http.post(f"/v1/uploads/{sid}/finish", json={"size": src.size, "sha256": sha}),
            "finish",
            200,
        )
        t3 = time.perf_counter()
        cpu = time.process_time() - cpu0
        got = done["asset"]["sha256"]
        if got != sha or done["asset"]["size"] != src.size:
            raise UploadError(
                f"finish answered sha256 {got} size {done['asset']['size']}, "
                f"expected {sha} size {src.size}"
            )
        return UploadTiming(
            seconds=t3 - t0, begin_s=t1 - t0, finish_s=t3 - t2, chunk_s=latencies,
            client_cpu=cpu, memory_id=done["memory_id"], sha256=got,
        )  # fmt: skip

    def _send_chunks(
        self,
        sid: str,
        src: Source,
        chunk_size: int,
        count: int,
        in_flight: int,
        pool: ThreadPoolExecutor,
    ) -> list[float]:
        indices: Iterator[int] = iter(range(count))
        lock = threading.Lock()
        failed = threading.Event()
        latencies: list[float] = [0.0] * count
        headers = {"Content-Type": "application/octet-stream"}

        def worker() -> None:
            while not failed.is_set():
                with lock:
                    index = next(indices, None)
                if index is None:
                    return
                offset = index * chunk_size
                data = src.read(offset, min(chunk_size, src.size - offset))
                started = time.perf_counter()
                try:
                    r = self.http.put(
                        f"/v1/uploads/{sid}/chunks/{index}", content=data, headers=headers
                    )
                    _check(r, f"chunk {index}", 200)
                except BaseException:
                    failed.set()
                    raise
                latencies[index] = time.perf_counter() - started
                del data

        futures = [pool.submit(worker) for _ in range(min(in_flight, count))]
        for f in futures:
            f.result()
        return latencies

    def read_back(self, memory_id: str) -> tuple[int, str, float]:
        """Stream the stored original: (bytes, hex SHA-256, seconds)."""
        digest = hashlib.sha256()
        n = 0
        started = time.perf_counter()
        with self.http.stream("GET", f"/v1/memories/{memory_id}/assets/original") as r:
            if r.status_code != 200:
                r.read()
                raise UploadError(f"read back: HTTP {r.status_code}: {r.text[:2000]}")
            for piece in r.iter_raw(READ_PIECE):
                digest.update(piece)
                n += len(piece)
        return n, digest.hexdigest(), time.perf_counter() - started


# --- servers -------------------------------------------------------------------------------------


def start_memvault(data_dir: Path, server: str) -> tuple[ServerProcess, str]:
    """Start memvault on a free port under ``uvicorn`` (memvault serve) or ``granian``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # No derivative jobs: the random bytes uploaded here would only be sniffed as unsupported,
    # and the bench deletes blobs between runs, under a job that might still want to read one.
    env = {"MEMVAULT_DATA_DIR": str(data_dir.resolve()), "MEMVAULT_DERIVATIVE_WORKERS": "0"}
    if server == "uvicorn":
        argv = python_argv("-m", "memvault", "serve", "--data", str(data_dir),
                           "--host", "127.0.0.1", "--port", str(port))  # fmt: skip
        proc = ServerProcess(argv, f"{base}/healthz", env=env)
    elif server == "granian":
        argv = python_argv(
            "-m", "granian", "--interface", "asgi", "--factory",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "memvault.http.app:create_app",
        )  # fmt: skip
        proc = ServerProcess(argv, f"{base}/healthz", env=env, follow_child=True)
    else:
        raise ValueError(server)
    proc.start()
    return proc, base


def read_token(data_dir: Path) -> str:
    return (data_dir / "admin.token").read_text(encoding="ascii").strip()


def blob_path(data_dir: Path, sha: str) -> Path:
    return data_dir / "blobs" / sha[:2] / sha[2:4] / sha


# --- results -------------------------------------------------------------------------------------


@dataclass
class Config:
    """One table row: ``repeat`` uploads of one size, ``in_flight`` chunks at a time."""

    server: str  # e.g. "memvault uvicorn"
    size: int
    in_flight: int
    idle_kib: int
    runs: list[UploadTiming] = field(default_factory=list)
    hwm_reset: bool = True
    note: str = ""

    @property
    def seconds(self) -> float:
        return median(r.seconds for r in self.runs)

    @property
    def mbps(self) -> float:
        return mb_per_s(self.size, self.seconds)

    @property
    def peak_kib(self) -> int:
        return max(r.hwm_kib for r in self.runs)

    def label(self) -> str:
        return f"{self.server} x{self.in_flight}"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def mib(kib: float) -> str:
    return f"{kib / 1024:.0f}"


def percentile(xs: Sequence[float], q: float) -> float:
    values = sorted(xs)
    if len(values) == 1:
        return values[0]
    return float(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1])


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the measurements ----------------------------------------------------------------------------


@dataclass
class ServerReport:
    """What a server left behind: log lines worth a look, leftovers, fd counts."""

    name: str
    lines: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.max_in_flight = max([*IN_FLIGHT, COMPARE_IN_FLIGHT])
        self.pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="chunk")
        self.configs: list[Config] = []  # section 1
        self.tus: list[Config] = []  # section 2
        self.asgi: list[Config] = []  # section 3
        self.asgi_failure: str | None = None
        self.verified: list[str] = []
        self.disk_refs: list[tuple[int, float]] = []  # (size, s) to write + fsync a source
        self.durable: list[float] = []  # s to write the compare file as 4 writers + fdatasync
        self.reports: list[ServerReport] = []
        self._server_seq = 0

    def close(self) -> None:
        self.pool.shutdown()

    # memvault

    def run_memvault(
        self,
        server: str,
        src: Source,
        in_flights: Sequence[int],
        repeat: int,
        *,
        read_back_first: bool,
    ) -> list[Config]:
        self._server_seq += 1
        data_dir = self.work / f"memvault-{server}-{self._server_seq}"
        proc, base = start_memvault(data_dir, server)
        report = ServerReport(f"memvault under {server} ({format_size(src.size)}, "
                              f"pid {proc.pid})")  # fmt: skip
        configs: list[Config] = []
        try:
            idle = proc.rss_kib()
            fds_idle = psutil.Process(proc.pid).num_fds()
            api = Api(base, read_token(data_dir), self.max_in_flight + 2)
            try:
                capsule = api.capsule()
                for in_flight in in_flights:
                    config = Config(f"memvault {server}", src.size, in_flight, idle)
                    configs.append(config)
                    for i in range(repeat):
                        run = self._one_upload(proc, api, capsule, src, in_flight, config)
                        extra = ""
                        if read_back_first and i == 0 and in_flight == in_flights[0]:
                            extra = self._read_back(api, run, src)
                        path = blob_path(data_dir, run.sha256)
                        if not path.is_file():
                            raise UploadError(f"committed blob not found at {path}")
                        path.unlink()
                        say(
                            f"  {config.label():24} {format_size(src.size):>7} run {i + 1}/"
                            f"{repeat}: {run.seconds:6.2f} s {mb_per_s(src.size, run.seconds):6.1f}"
                            f" MB/s  finish {ms(run.finish_s):>4} ms  peak {mib(run.hwm_kib)} MiB"
                            f"  rss after {mib(run.rss_after_kib)} MiB  fds {run.fds_after}"
                            f"  (sha256 ok{extra})"
                        )
                        src.next_variant()
            finally:
                api.close()
                report.lines.extend(self._log_findings(proc.log_tail(64 * MiB)))
            time.sleep(0.5)  # let the server see the client's connections close
            report.lines.extend(self._leftovers(data_dir, proc, idle, fds_idle))
        finally:
            proc.stop()
            shutil.rmtree(data_dir, ignore_errors=True)
            self.reports.append(report)
        return configs

    def _one_upload(
        self,
        proc: ServerProcess,
        api: Api,
        capsule: str,
        src: Source,
        in_flight: int,
        config: Config,
    ) -> UploadTiming:
        os.sync()  # no earlier writeback competes with the timed upload
        rss_before = proc.rss_kib()
        config.hwm_reset = proc.reset_hwm() and config.hwm_reset
        cpu_before = proc.cpu_seconds()
        try:
            run = api.upload(capsule, src, in_flight, self.pool)
        except (UploadError, httpx.HTTPError) as exc:
            raise UploadError(f"{exc}\n--- server log tail ---\n{proc.log_tail()}") from exc
        run.server_cpu = proc.cpu_seconds() - cpu_before
        run.hwm_kib = proc.hwm_kib()
        run.rss_before_kib = rss_before
        run.rss_after_kib = proc.rss_kib()
        run.fds_after = psutil.Process(proc.pid).num_fds()
        config.runs.append(run)
        return run

    def _read_back(self, api: Api, run: UploadTiming, src: Source) -> str:
        n, sha, seconds = api.read_back(run.memory_id)
        if n != src.size or sha != src.sha256:
            raise UploadError(
                f"read back {n} bytes sha256 {sha}; uploaded {src.size} bytes {src.sha256}"
            )
        self.verified.append(
            f"{format_size(src.size)}: read back through GET .../assets/original, "
            f"{n} bytes, sha256 matches ({mb_per_s(n, seconds):.0f} MB/s, untimed)"
        )
        return ", read back ok"

    def _leftovers(
        self, data_dir: Path, proc: ServerProcess, idle_kib: int, fds_idle: int
    ) -> list[str]:
        lines = []
        staging = sorted((data_dir / "staging").iterdir())
        if staging:
            lines.append(f"{len(staging)} file(s) left in staging/: {[p.name for p in staging]}")
        process = psutil.Process(proc.pid)
        fds = process.num_fds()
        rss = proc.rss_kib()
        lines.append(
            f"after all uploads (client disconnected): open fds {fds_idle} idle -> {fds}, "
            f"threads {process.num_threads()}, RSS {mib(idle_kib)} MiB idle -> {mib(rss)} MiB"
        )
        return lines

    @staticmethod
    def _log_findings(log: str) -> list[str]:
        """Server log lines that look like trouble (errors, tracebacks, warnings)."""
        keys = ("error", "traceback", "exception", "critical", "warning", "[warn")
        found = [
            line.strip()
            for line in log.splitlines()
            if any(k in line.lower() for k in keys) and "admin.created" not in line
        ]
        if not found:
            return ["server log: no errors, warnings or tracebacks"]
        shown = found[:20]
        more = f" (+{len(found) - 20} more)" if len(found) > 20 else ""
        return [f"server log: {len(found)} suspicious line(s){more}:", *shown]

    # tus

    def run_tus(self, src: Source, repeat: int) -> None:
        store = self.work / "tus-store"
        port = free_port()
        bypass_proxies_for_loopback()
        with run_tuspyserver(store, port) as server:
            note = "tuspy client, 1 PATCH at a time, no fsync: its bytes may still be only in "
            note += "the page cache when it answers"
            config = Config("tuspyserver uvicorn", src.size, 1, server.rss_kib(), note=note)
            for i in range(repeat):
                os.sync()  # no earlier writeback competes with the timed upload
                rss_before = server.rss_kib()
                config.hwm_reset = server.reset_hwm() and config.hwm_reset
                cpu_before = server.cpu_seconds()
                cpu0 = time.process_time()
                seconds = upload_with_tuspy(tus_endpoint(port), src.path, files_dir=store)
                # upload_with_tuspy verifies untimed (it hashes both files): CPU is approximate
                run = UploadTiming(seconds=seconds, begin_s=0.0, finish_s=0.0, chunk_s=[],
                                   client_cpu=time.process_time() - cpu0, memory_id="",
                                   sha256=src.sha256)  # fmt: skip
                run.server_cpu = server.cpu_seconds() - cpu_before
                run.hwm_kib = server.hwm_kib()
                run.rss_before_kib = rss_before
                run.rss_after_kib = server.rss_kib()
                config.runs.append(run)
                for entry in store.iterdir():
                    if entry.is_file():
                        entry.unlink()
                say(
                    f"  {'tuspyserver':24} {format_size(src.size):>7} run {i + 1}/{repeat}: "
                    f"{seconds:6.2f} s {mb_per_s(src.size, seconds):6.1f} MB/s  "
                    f"peak {mib(run.hwm_kib)} MiB  (stored file verified)"
                )
                # The disk's ceiling for a server that syncs every chunk, in the same minute.
                os.sync()
                durable = durable_write_seconds(src.path, src.size, self.work / "durable.bin")
                self.durable.append(durable)
                say(f"  {'disk: 4 writers, sync/chunk':24} {format_size(src.size):>7} run "
                    f"{i + 1}/{repeat}: {durable:6.2f} s {mb_per_s(src.size, durable):6.1f} MB/s")
            report = ServerReport(f"tuspyserver ({format_size(src.size)})")
            report.lines = self._log_findings(server.log_tail(64 * MiB))
            self.reports.append(report)
        shutil.rmtree(store, ignore_errors=True)
        self.tus.append(config)

    # ASGI servers

    def run_asgi(self, src: Source, repeat: int) -> None:
        for server in ("uvicorn", "granian"):
            if server == "granian" and self.args.skip_granian:
                continue
            try:
                configs = self.run_memvault(server, src, [COMPARE_IN_FLIGHT], repeat,
                                            read_back_first=server == "granian")  # fmt: skip
            except (UploadError, RuntimeError, TimeoutError, OSError, httpx.HTTPError) as exc:
                if server != "granian":
                    raise
                self.asgi_failure = f"granian could not run the app: {exc}"
                say(self.asgi_failure)
                continue
            self.asgi.extend(configs)


# --- output --------------------------------------------------------------------------------------


def config_row(c: Config, ref: Config | None = None) -> list[object]:
    runs = c.runs
    row: list[object] = [
        c.label(),
        format_size(c.size),
        len(runs),
        f"{c.seconds:.2f}",
        c.mbps,
        f"{min(mb_per_s(c.size, r.seconds) for r in runs):.0f}"
        f"-{max(mb_per_s(c.size, r.seconds) for r in runs):.0f}",
        ms(median(r.finish_s for r in runs)) if runs[0].chunk_s else "-",
        ms(max(r.finish_s for r in runs)) if runs[0].chunk_s else "-",
        f"{median(r.server_cpu for r in runs):.1f}",
        f"{median(r.client_cpu for r in runs):.1f}",
        mib(c.idle_kib),
        mib(c.peak_kib),
        mib(c.peak_kib - c.idle_kib),
    ]
    if ref is not None:
        row.append(f"{c.mbps / ref.mbps:.2f}")
    return row


CONFIG_HEADERS = [
    "config", "size", "runs", "s (med)", "MB/s", "MB/s range", "finish ms", "finish max",
    "srv CPU s", "cli CPU s", "idle MiB", "peak MiB", "peak-idle",
]  # fmt: skip


def print_latencies(configs: Sequence[Config]) -> None:
    rows: list[list[object]] = []
    for c in configs:
        chunks = [x for r in c.runs for x in r.chunk_s]
        if not chunks:
            continue
        rows.append([
            c.label(), format_size(c.size), len(c.runs),
            ms(median(r.begin_s for r in c.runs)),
            ms(median(r.finish_s for r in c.runs)), ms(min(r.finish_s for r in c.runs)),
            ms(max(r.finish_s for r in c.runs)),
            len(chunks), ms(median(chunks)), ms(percentile(chunks, 99)), ms(max(chunks)),
        ])  # fmt: skip
    print_table(
        ["config", "size", "runs", "begin ms", "finish med", "finish min", "finish max",
         "chunks", "PUT p50 ms", "PUT p99 ms", "PUT max ms"],
        rows,
    )  # fmt: skip


def print_finish_pooled(configs: Sequence[Config]) -> None:
    by: dict[tuple[str, int], list[float]] = {}
    for c in configs:
        if c.runs and c.runs[0].chunk_s:
            by.setdefault((c.server, c.size), []).extend(r.finish_s for r in c.runs)
    rows = [
        [server, format_size(size), len(xs), ms(median(xs)), ms(max(xs))]
        for (server, size), xs in by.items()
    ]
    print_table(["server", "size", "uploads", "finish median ms", "finish max ms"], rows)


def versions() -> str:
    names = ("uvicorn", "httptools", "uvloop", "granian", "fastapi", "httpx", "tuspyserver",
             "tuspy")  # fmt: skip
    parts = []
    for name in names:
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} (missing)")
    return ", ".join(parts)


# --- main ----------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    sizes = sorted({parse_size(part) for part in text.split(",") if part.strip()})
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes given")
    if sizes[0] < 1 * MiB:
        raise argparse.ArgumentTypeError("sizes must be at least 1 MiB")
    return sizes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="memvault upload throughput, latency and server memory on 127.0.0.1, "
        "beside tuspyserver and under uvicorn vs granian. Prints figures; asserts no speed."
    )
    parser.add_argument(
        "--sizes", type=parse_sizes, default=None, metavar="LIST",
        help=f"comma-separated file sizes, binary units (default {DEFAULT_SIZES})",
    )  # fmt: skip
    parser.add_argument(
        "--repeat", type=int, default=None, metavar="N",
        help="uploads per configuration; the table shows their median (default 3)",
    )  # fmt: skip
    parser.add_argument("--skip-tus", action="store_true", help="leave out tuspyserver")
    parser.add_argument("--skip-granian", action="store_true", help="leave out granian")
    parser.add_argument(
        "--quick", action="store_true",
        help=f"smoke run: {QUICK_SIZE} only, 1 repeat (overrides --sizes/--repeat defaults)",
    )  # fmt: skip
    parser.add_argument(
        "--tmp-dir", type=Path, default=None, metavar="DIR",
        help="parent of the temporary working directory (default: the system's, /tmp)",
    )  # fmt: skip
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw_argv)
    sizes: list[int] = args.sizes or parse_sizes(QUICK_SIZE if args.quick else DEFAULT_SIZES)
    repeat: int = args.repeat or (1 if args.quick else 3)
    if repeat < 1:
        parser.error("--repeat must be >= 1")
    compare = COMPARE_SIZE if COMPARE_SIZE in sizes else sizes[0]

    started = time.perf_counter()
    overrides = sorted(k for k in os.environ if k.startswith("MEMVAULT_"))
    print(
        f"memvault upload benchmark — {platform.node()}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / GiB:.1f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}\n{versions()}",
        flush=True,
    )
    if overrides:
        print(f"NOTE: MEMVAULT_* set in the environment, so not default settings: {overrides}")

    with tempfile.TemporaryDirectory(prefix="memvault-bench-upload-", dir=args.tmp_dir) as tmp:
        work = Path(tmp)
        bench = Bench(args, work)
        try:
            for size in sizes:
                path = work / f"source-{format_size(size).replace(' ', '')}.bin"
                say(f"writing {format_size(size)} source file and hashing it ...")
                os.sync()
                t0 = time.perf_counter()
                make_file(path, size, seed=size % 65521)  # ends with an fsync
                bench.disk_refs.append((size, time.perf_counter() - t0))
                src = Source(path, size)
                try:
                    in_flights = list(IN_FLIGHT)
                    say(f"memvault (memvault serve: uvicorn+httptools), {format_size(size)}:")
                    configs = bench.run_memvault(
                        "uvicorn", src, in_flights, repeat, read_back_first=True
                    )
                    bench.configs.extend(configs)
                    if size == compare and not args.skip_tus:
                        say(f"tuspyserver, {format_size(size)}:")
                        bench.run_tus(src, repeat)
                    if size == compare:
                        say(f"ASGI servers, {format_size(size)} x{COMPARE_IN_FLIGHT} in flight:")
                        bench.run_asgi(src, repeat)
                finally:
                    src.close()
                    path.unlink()
        finally:
            bench.close()
        report(bench, args, sizes, repeat, compare, raw_argv, time.perf_counter() - started)


def report(
    bench: Bench,
    args: argparse.Namespace,
    sizes: Sequence[int],
    repeat: int,
    compare: int,
    raw_argv: Sequence[str],
    elapsed: float,
) -> None:
    out: Callable[[str], None] = lambda s: print(s, flush=True)  # noqa: E731
    out(
        "\nMB/s = 10^6 bytes/s over begin -> all chunks -> finish, median of the runs; "
        "finish = the finish call alone;\nsrv/cli CPU = user+sys CPU seconds per upload "
        "(server process / this client process); RSS of the serving process in MiB:\n"
        "idle = VmRSS after start, before any upload; peak = VmHWM, reset before each upload, "
        "max over the runs.\n"
    )
    out("1. memvault, embedded (SQLite + local folder), memvault serve "
        "(uvicorn+httptools+uvloop), 8 MiB chunks, fsync per chunk")  # fmt: skip
    print_table(CONFIG_HEADERS, [config_row(c) for c in bench.configs])
    out("   latencies (ms)")
    print_latencies(bench.configs)
    out("   finish latency, all uploads of a size on the memvault serve server")
    print_finish_pooled(bench.configs)

    if bench.tus:
        tus = bench.tus[0]
        out(f"2. memvault vs tuspyserver, {format_size(compare)} "
            "(ratio = MB/s / tuspyserver's MB/s)")  # fmt: skip
        side = [c for c in bench.configs if c.size == compare]
        rows = [config_row(c, tus) for c in side]
        rows.append(config_row(tus, tus))
        print_table([*CONFIG_HEADERS, "ratio"], rows)
        out(f"   tuspyserver: {tus.note}; memvault: httpx client, fsync per chunk")
        if bench.durable:
            ceiling = mb_per_s(compare, median(bench.durable))
            target = 1.5 * tus.mbps
            out(f"   disk ceiling for a server that fdatasyncs every 8 MiB chunk (4 writers, "
                f"no HTTP, no hashing; after each tuspyserver run): {ceiling:.0f} MB/s "
                f"median ({', '.join(f'{mb_per_s(compare, d):.0f}' for d in bench.durable)})")
            verdict = "above" if target > ceiling else "within"
            out(f"   1.5 x tuspyserver = {target:.0f} MB/s: {verdict} what this disk made "
                f"durable in this run ({ceiling / tus.mbps:.2f} x tuspyserver)")
        out("")

    if bench.asgi or bench.asgi_failure:
        out(f"3. memvault's ASGI server, {format_size(compare)} x{COMPARE_IN_FLIGHT} in flight "
            "(fresh server each)")  # fmt: skip
        if bench.asgi:
            ref = bench.asgi[0]
            print_table([*CONFIG_HEADERS, "vs uvicorn"],
                        [config_row(c, ref) for c in bench.asgi])  # fmt: skip
            print_latencies(bench.asgi)
        if bench.asgi_failure:
            out(f"   {bench.asgi_failure}\n")

    out("Summary")
    summary: list[list[object]] = []
    for section, configs in (("1", bench.configs), ("2", bench.tus), ("3", bench.asgi)):
        for c in configs:
            summary.append([
                section, c.label(), format_size(c.size), f"{c.mbps:.0f}",
                ms(median(r.finish_s for r in c.runs)) if c.runs[0].chunk_s else "-",
                mib(c.idle_kib), mib(c.peak_kib), mib(c.peak_kib - c.idle_kib),
            ])  # fmt: skip
    print_table(["#", "config", "size", "MB/s", "finish ms", "idle MiB", "peak MiB",
                 "peak-idle MiB"], summary)  # fmt: skip

    for size, seconds in bench.disk_refs:
        out(
            f"Disk, for scale: writing the {format_size(size)} source file (one stream, "
            f"page cache) and fsyncing it took {seconds:.2f} s = "
            f"{mb_per_s(size, seconds):.0f} MB/s"
        )
    out("")
    out("Verification")
    uploads = sum(len(c.runs) for c in (*bench.configs, *bench.asgi))
    out(f"  {uploads} memvault uploads: finish's sha256 equals the file's for every one")
    for line in bench.verified:
        out(f"  {line}")
    if bench.tus:
        out(f"  {len(bench.tus[0].runs)} tus uploads: stored file's size and sha256 checked")
    if any(not c.hwm_reset for c in (*bench.configs, *bench.tus, *bench.asgi)):
        out("  NOTE: VmHWM could not be reset here; peaks count from process start")
    out("\nServers")
    for rep in bench.reports:
        out(f"  {rep.name}:")
        for line in rep.lines:
            out(f"    {line}")
    flags = [*raw_argv]
    out(
        f"\nsizes {', '.join(format_size(s) for s in sizes)}; repeat {repeat}; "
        f"total {elapsed:.0f} s"
    )
    out(f"command: ./run bench upload {shlex.join(flags)}".rstrip())
    out(f"  (= {shlex.join([sys.executable, sys.argv[0], *flags])})")


if __name__ == "__main__":
    main()
