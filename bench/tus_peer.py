"""The tus peer for the upload benchmark: tuspyserver under uvicorn, fed by the tuspy client.

``run_tuspyserver`` starts tuspyserver's FastAPI router (app in ``_tus_app.py``) under uvicorn in
a subprocess on 127.0.0.1; ``upload_with_tuspy`` uploads a file to it with tuspy's
``TusClient`` and checks the bytes that landed on disk. Run alone it prints throughput and the
server's memory for the sizes asked::

    .venv/bin/python bench/tus_peer.py --size 256M --size 1G
    .venv/bin/python bench/tus_peer.py --size 1G --http httptools --http h11 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from tusclient.client import TusClient

from _common import (
    MiB,
    ServerProcess,
    format_size,
    free_port,
    make_file,
    mb_per_s,
    median,
    parse_size,
    print_table,
    python_argv,
    require_loopback,
    same_file_content,
)
from _tus_app import BACKEND_ENV, BACKENDS, FILES_DIR_ENV, PREFIX

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_CHUNK_SIZE = 8 * MiB
HTTP_IMPLS = ("httptools", "h11")
LOOPS = ("uvloop", "asyncio")


def tus_endpoint(port: int) -> str:
    """The tus creation URL of a peer started on ``port``."""
    return f"http://127.0.0.1:{port}/{PREFIX}"


def run_tuspyserver(
    data_dir: Path,
    port: int,
    *,
    http: str = "httptools",
    loop: str = "uvloop",
    backend: str = "files-dir",
) -> ServerProcess:
    """Start tuspyserver under uvicorn on 127.0.0.1:``port``, storing uploads in ``data_dir``.

    Returns the started server; use it as a context manager to stop it. Its endpoint is
    ``tus_endpoint(port)``. uvicorn runs one worker in the started process itself, so
    ``ServerProcess.pid`` is the serving process. ``http``/``loop`` are uvicorn's ``--http`` and
    ``--loop``; ``backend`` is described in ``_tus_app.py``. Access logging is off.
    """
    if http not in HTTP_IMPLS:
        raise ValueError(f"http must be one of {HTTP_IMPLS}, not {http!r}")
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, not {loop!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = python_argv(
        "-m", "uvicorn", "--factory", "_tus_app:app_from_env",
        "--app-dir", str(BENCH_DIR),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--http", http,
        "--loop", loop,
        "--no-access-log",
        "--log-level", "warning",
    )  # fmt: skip
    env = {FILES_DIR_ENV: str(data_dir.resolve()), BACKEND_ENV: backend}
    # ServerProcess counts any HTTP status as up (GET on the tus endpoint is not a tus verb).
    return ServerProcess(argv, f"{tus_endpoint(port)}/", env=env).start()


def upload_with_tuspy(
    url: str,
    path: Path,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    files_dir: Path,
) -> float:
    """Upload ``path`` to the tus endpoint ``url`` with tuspy; return the seconds it took.

    The timed region is tuspy's work only: creating the upload (POST) and sending every chunk
    (one PATCH of ``chunk_size`` bytes each). Afterwards, untimed, the stored file
    ``files_dir/<upload id>`` must have the source's size and SHA-256, else ``AssertionError``.
    The stored file is left in place.
    """
    require_loopback(url)
    client = TusClient(url)
    metadata = {"filename": path.name, "filetype": "application/octet-stream"}
    started = time.perf_counter()
    uploader = client.uploader(file_path=str(path), chunk_size=chunk_size, metadata=metadata)
    uploader.upload()
    elapsed = time.perf_counter() - started
    location = str(uploader.url)
    require_loopback(location)
    upload_id = PurePosixPath(urlsplit(location).path).name
    same_file_content(path, files_dir / upload_id)
    return elapsed


def bypass_proxies_for_loopback() -> None:
    """Make sure ``requests`` (used by tuspy) never sends loopback traffic through a proxy."""
    for var in ("NO_PROXY", "no_proxy"):
        entries = [e for e in os.environ.get(var, "").split(",") if e]
        os.environ[var] = ",".join([*entries, "127.0.0.1", "localhost"])


def _clear_dir(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_file():
            entry.unlink()


def _measure(
    http: str,
    loop: str,
    backend: str,
    source: Path,
    store: Path,
    chunk_size: int,
    repeat: int,
) -> list[object]:
    """One table row: a fresh server, ``repeat`` uploads of ``source``."""
    size = source.stat().st_size
    port = free_port()
    with run_tuspyserver(store, port, http=http, loop=loop, backend=backend) as server:
        idle = server.rss_kib()
        hwm_reset = server.reset_hwm()
        cpu_before = server.cpu_seconds()
        times: list[float] = []
        for i in range(repeat):
            seconds = upload_with_tuspy(tus_endpoint(port), source, chunk_size, files_dir=store)
            times.append(seconds)
            print(
                f"  {http:9} {format_size(size):>8}  run {i + 1}/{repeat}: {seconds:7.2f} s  "
                f"{mb_per_s(size, seconds):7.1f} MB/s  (verified)",
                file=sys.stderr,
                flush=True,
            )
            _clear_dir(store)
        peak = server.hwm_kib()
        cpu_per_run = (server.cpu_seconds() - cpu_before) / repeat
    seconds = median(times)
    return [
        f"tuspyserver/{backend}",
        f"uvicorn {http}+{loop}",
        format_size(size),
        repeat,
        f"{seconds:.2f}",
        mb_per_s(size, seconds),
        f"{cpu_per_run:.2f}",
        idle / 1024,
        peak / 1024,
        (peak - idle) / 1024,
        "upload" if hwm_reset else "process",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="tuspyserver (uvicorn) receiving tuspy uploads on 127.0.0.1: "
        "throughput and server memory. Each upload is verified (size + SHA-256) untimed."
    )
    parser.add_argument(
        "--size", action="append", type=parse_size, metavar="SIZE",
        help="file size to upload, e.g. 256M, 1G (repeatable; default 1G)",
    )  # fmt: skip
    parser.add_argument(
        "--chunk-size", type=parse_size, default=DEFAULT_CHUNK_SIZE, metavar="SIZE",
        help="tuspy chunk size, one PATCH each (default 8M)",
    )  # fmt: skip
    parser.add_argument(
        "--repeat", type=int, default=1, metavar="N",
        help="uploads per size and server; MB/s is their median (default 1)",
    )  # fmt: skip
    parser.add_argument(
        "--http", action="append", choices=HTTP_IMPLS,
        help="uvicorn HTTP implementation (repeatable to compare; default httptools)",
    )  # fmt: skip
    parser.add_argument("--loop", choices=LOOPS, default="uvloop", help="default uvloop")
    parser.add_argument(
        "--backend", choices=BACKENDS, default="files-dir",
        help="tuspyserver storage path, see bench/_tus_app.py (default files-dir)",
    )  # fmt: skip
    parser.add_argument(
        "--tmp-dir", type=Path, default=None,
        help="parent of the temporary working directory (default: the system's, /tmp)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    sizes: list[int] = args.size or [parse_size("1G")]
    https: list[str] = args.http or ["httptools"]
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    bypass_proxies_for_loopback()
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="memvault-bench-tus-", dir=args.tmp_dir) as tmp:
        work = Path(tmp)
        store = work / "store"
        for size in sizes:
            source = work / f"source-{size}.bin"
            print(f"writing {format_size(size)} source file ...", file=sys.stderr, flush=True)
            make_file(source, size)
            for http in https:
                rows.append(
                    _measure(
                        http, args.loop, args.backend, source, store, args.chunk_size, args.repeat
                    )
                )
            source.unlink()

    print(
        f"\ntuspy client -> tuspyserver, 127.0.0.1, chunk {format_size(args.chunk_size)}; "
        "MB/s = 10^6 B/s; srv CPU s = server CPU (user+sys) per upload, mean;\n"
        "RSS in MiB of the uvicorn process; 'peak since upload' = VmHWM reset after idle RSS"
    )
    print_table(
        [
            "server", "http", "size", "runs", "s (median)", "MB/s", "srv CPU s",
            "idle RSS", "peak RSS", "peak-idle", "peak since",
        ],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
