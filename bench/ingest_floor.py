"""The floor of this machine: how fast can bytes be durably stored and hashed at all?

Run as ``./run bench ingest_floor``. It is a measuring tool, not a server to use: a bare
``asyncio.BufferedProtocol`` on uvloop, in a process of its own, that takes ``PUT`` requests
with a ``Content-Length`` (and nothing else of HTTP), reads each body straight into
preallocated 1 MiB buffers (``recv_into``: one copy, out of the kernel) and, in the
connection's worker thread, SHA-256-hashes each buffer and ``pwritev``s it into a file,
with ``fdatasync`` before the answer. That is the per-byte work memvault must do and none
of the rest: no ASGI, no framework, no metadata store, no hash state carried across chunks.
The same httpx client as ``bench/upload.py`` sends 128 x 8 MiB chunks at 1 and 4 in flight,
and tuspyserver (tuspy client, 8 MiB PATCHes, no fsync, no hash) takes the same 1 GiB in
the same run. If this floor is below 1.5 x tuspyserver, no Python server on this machine
meets that target while it fsyncs and hashes every byte.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import httpx

from _common import ServerProcess, free_port, print_table, python_argv
from tus_peer import run_tuspyserver, tus_endpoint, upload_with_tuspy

CHUNK = 8 * 1024 * 1024
COUNT = 128
BUFFER = 1024 * 1024
HEAD_MAX = 16 * 1024


class _Ingest(asyncio.BufferedProtocol):
    """One connection, requests one after another: head, then the body into buffers."""

    def __init__(self, root: Path, sync: bool) -> None:
        self.root, self.sync = root, sync
        self.pool = ThreadPoolExecutor(1)  # one worker: the buffers are hashed in order
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.head_buffer = bytearray(HEAD_MAX)
        self.free = [bytearray(BUFFER) for _ in range(2)]  # one filling, one being stored
        self.current: bytearray | None = None
        self.filled = self.remaining = self.offset = 0
        self.fd = -1
        self.sha = hashlib.sha256()
        self.stored: list[asyncio.Future[None]] = []
        self.answering: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def get_buffer(self, sizehint: int) -> memoryview:
        if not self.remaining:
            return memoryview(self.head_buffer)
        if self.current is None:
            self.current, self.filled = self.free.pop(), 0
        return memoryview(self.current)[self.filled:min(BUFFER, self.filled + self.remaining)]

    def buffer_updated(self, nbytes: int) -> None:
        if self.remaining:
            self._body(nbytes)
            return
        self.head += self.head_buffer[:nbytes]
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return
        rest = bytes(self.head[end + 4:])
        self._start(bytes(self.head[:end]))
        self.head = bytearray()
        while rest and self.remaining:  # body bytes that came with the head
            target = self.get_buffer(len(rest))
            n = min(len(target), len(rest))
            target[:n] = rest[:n]
            rest = rest[n:]
            self._body(n)

    def _start(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(b":")
                                                                 for h in lines[1:])}
        self.remaining = int(fields.get(b"content-length", b"0"))
        self.offset, self.sha = 0, hashlib.sha256()
        if not self.remaining:
            self._answer_now()
            return
        name = lines[0].split(b" ")[1].decode().strip("/").replace("/", "_") or "root"
        self.fd = os.open(self.root / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def _body(self, nbytes: int) -> None:
        self.filled += nbytes
        self.remaining -= nbytes
        if self.filled < BUFFER and self.remaining:
            return
        buffer, length, offset, last = self.current, self.filled, self.offset, not self.remaining
        assert buffer is not None
        assert self.transport is not None
        self.current, self.offset = None, self.offset + length
        stored = self.loop.run_in_executor(self.pool, self._store, buffer, length, offset, last)
        self.stored.append(stored)
        stored.add_done_callback(lambda _: self._returned(buffer))
        if not self.free:
            self.transport.pause_reading()
        if last:
            self.answering = asyncio.ensure_future(self._answer(self.stored))
            self.stored = []

    def _store(self, buffer: bytearray, length: int, offset: int, last: bool) -> None:
        view = memoryview(buffer)[:length]
        self.sha.update(view)
        os.pwritev(self.fd, [view], offset)
        if last:
            if self.sync:
                os.fdatasync(self.fd)
            os.close(self.fd)

    def _returned(self, buffer: bytearray) -> None:
        self.free.append(buffer)
        if self.transport is not None and len(self.free) == 1:
            self.transport.resume_reading()

    async def _answer(self, stored: list[asyncio.Future[None]]) -> None:
        await asyncio.gather(*stored)
        self._answer_now()

    def _answer_now(self) -> None:
        digest = self.sha.hexdigest().encode()
        if self.transport is not None:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(digest), digest))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool.shutdown(wait=False)


def serve(root: Path, port: int, sync: bool) -> None:
    import uvloop

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(
            lambda: _Ingest(root, sync), "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


def _send(url: str, in_flight: int, body: bytes) -> float:
    want = hashlib.sha256(body).hexdigest()
    with httpx.Client(base_url=url, timeout=120, trust_env=False,
                      limits=httpx.Limits(max_connections=in_flight)) as client:
        start = time.perf_counter()
        with ThreadPoolExecutor(in_flight) as pool:
            for r in pool.map(lambda i: client.put(f"/c/{i}", content=body), range(COUNT)):
                r.raise_for_status()
                if r.text != want:
                    raise RuntimeError(f"the floor server hashed {r.text!r}, not {want}")
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--serve", nargs=3, metavar=("DIR", "PORT", "SYNC"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), int(args.serve[1]), args.serve[2] == "sync")
        return
    body = os.urandom(CHUNK)
    rows = []
    with tempfile.TemporaryDirectory(prefix="memvault-floor-") as tmp:
        root = Path(tmp)
        (root / "floor").mkdir()
        for sync in ("sync", "nosync"):
            port = free_port()
            argv = python_argv(str(Path(__file__).resolve()), "--serve", str(root / "floor"),
                               str(port), sync)
            label = ("floor: recv_into, SHA-256, pwritev, fdatasync" if sync == "sync"
                     else "floor without fdatasync")
            with ServerProcess(argv, f"http://127.0.0.1:{port}/ready"):
                for run in range(1, args.repeat + 1):
                    for in_flight in (1, 4):
                        seconds = _send(f"http://127.0.0.1:{port}", in_flight, body)
                        rows.append([label, in_flight, run,
                                     f"{COUNT * CHUNK / 1e6 / seconds:.0f}"])
        source = root / "source.bin"
        with source.open("wb") as f:
            for _ in range(COUNT):
                f.write(body)
        tus_port = free_port()
        with run_tuspyserver(root / "tus", tus_port):
            for run in range(1, args.repeat + 1):
                seconds = upload_with_tuspy(tus_endpoint(tus_port), source,
                                            files_dir=root / "tus")
                rows.append(["tuspyserver: tuspy, no fsync, no hash", 1, run,
                             f"{COUNT * CHUNK / 1e6 / seconds:.0f}"])
                for f in (root / "tus").iterdir():
                    if f.is_file():
                        f.unlink()
    print_table(["server", "in flight", "run", "MB/s"], rows)
    print(f"command: ./run bench ingest_floor --repeat {args.repeat}", file=sys.stdout)


if __name__ == "__main__":
    main()
