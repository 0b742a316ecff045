"""What one request of each kind costs the server: wall time and the server's CPU time.

Run as ``./run bench request_cost [--uploads N]``. It starts ``memvault serve`` (default
settings) on 127.0.0.1 in a temporary directory (removed at the end) and, with one httpx
client, sends requests one at a time: ``/healthz`` (no token, no database), a listing (the
token check and one query), then for each of N small uploads (1000 bytes: one chunk) begin,
status, the chunk, finish, the memory and the asset's bytes, in rounds of 25 (below the
per-capsule cap on pending sessions). For each kind it prints the mean wall time per request
and the server process's CPU time (user + system, from ``/proc/PID/stat``) per request.

This is the fixed cost of an upload, which dominates for small files (a 3 MB photo, its
display, thumb and placeholder), apart from the per-byte costs ``bench/upload.py`` measures.
A second section uploads ``--files`` files of 100 KB through the SDK (``upload_file``), one
at a time and 8 at once, and prints files per second with the server's and the client's CPU
per file: what a folder of small files gets. It prints figures and asserts nothing about
speed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import crc32c
import httpx

from _common import ServerProcess, print_table
from memvault.client import AsyncClient, Capsule
from upload import read_token, start_memvault

ROUND = 25


class Costs:
    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.totals: dict[str, list[float]] = {}

    async def run(self, kind: str, send: Callable[[int], Awaitable[None]],
                  indices: Sequence[int]) -> None:
        cpu, start = self.server.cpu_seconds(), time.perf_counter()
        for i in indices:
            await send(i)
        wall, used = time.perf_counter() - start, self.server.cpu_seconds() - cpu
        total = self.totals.setdefault(kind, [0.0, 0.0, 0])
        total[0] += wall
        total[1] += used
        total[2] += len(indices)

    def rows(self) -> list[list[str]]:
        return [[kind, str(int(n)), f"{wall / n * 1000:.2f}", f"{used / n * 1000:.2f}"]
                for kind, (wall, used, n) in self.totals.items()]


async def measure(server: ServerProcess, base: str, token: str, uploads: int) -> Costs:
    costs = Costs(server)
    async with httpx.AsyncClient(base_url=base, timeout=60,
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        capsule = (await http.post("/v1/capsules", json={"name": "bench"})).json()["id"]
        sessions: dict[int, str] = {}
        memories: dict[int, str] = {}
        contents: dict[int, bytes] = {}

        async def ok(response: Awaitable[httpx.Response]) -> httpx.Response:
            answer = await response
            answer.raise_for_status()
            return answer

        async def begin(i: int) -> None:
            contents[i] = os.urandom(1000)
            answer = await ok(http.post("/v1/uploads", json={
                "capsule_id": capsule, "filename": f"f{i}.bin",
                "content_type": "application/octet-stream", "size": len(contents[i]),
                "idempotency_key": f"bench-{i}"}))
            sessions[i] = answer.json()["id"]

        async def chunk(i: int) -> None:
            crc = base64.b64encode(crc32c.crc32c(contents[i]).to_bytes(4, "big")).decode()
            await ok(http.put(f"/v1/uploads/{sessions[i]}/chunks/0", content=contents[i],
                              headers={"Content-Type": "application/octet-stream",
                                       "Content-Digest": f"crc32c=:{crc}:"}))

        async def finish(i: int) -> None:
            answer = await ok(http.post(f"/v1/uploads/{sessions[i]}/finish", json={
                "size": len(contents[i]), "sha256": hashlib.sha256(contents[i]).hexdigest()}))
            memories[i] = answer.json()["memory_id"]

        async def status(i: int) -> None:
            await ok(http.get(f"/v1/uploads/{sessions[i]}"))

        async def memory(i: int) -> None:
            await ok(http.get(f"/v1/memories/{memories[i]}"))

        async def asset(i: int) -> None:
            await ok(http.get(f"/v1/memories/{memories[i]}/assets/original"))

        async def health(_: int) -> None:
            await ok(http.get("/healthz"))

        async def listing(_: int) -> None:
            await ok(http.get("/v1/capsules"))

        warm = range(-ROUND, 0)  # untimed: connections, caches, the first compiles
        for i in warm:
            await begin(i)
            await chunk(i)
            await finish(i)
        rounds = [range(r, r + ROUND) for r in range(0, uploads, ROUND)]
        await costs.run("GET /healthz", health, range(uploads))
        await costs.run("GET /v1/capsules", listing, range(uploads))
        for indices in rounds:
            for kind, send in (("POST /v1/uploads (begin)", begin),
                               ("GET /v1/uploads/{id}", status),
                               ("PUT chunk, 1000 bytes", chunk),
                               ("POST finish", finish),
                               ("GET /v1/memories/{id}", memory),
                               ("GET asset bytes", asset)):
                await costs.run(kind, send, indices)
    return costs


SMALL_FILE = 100_000


async def small_files(server: ServerProcess, base: str, token: str, work: Path,
                      files: int) -> list[list[str]]:
    """``files`` uploads of 100 KB through the SDK at 1 and 8 at once (after 10 untimed)."""
    rows = []
    async with AsyncClient(base, token, state_dir=work / "sdk-state") as mv:
        for at_once in (1, 8):
            folder = work / f"small-{at_once}"
            folder.mkdir()
            paths = []
            for i in range(files + 10):
                path = folder / f"f{i}.bin"
                path.write_bytes(os.urandom(SMALL_FILE))
                paths.append(path)
            cap = await mv.create_capsule(f"bench-small-{at_once}")
            slots = asyncio.Semaphore(at_once)
            await asyncio.gather(*(_upload(mv, p, cap, slots) for p in paths[:10]))
            cpu, client, start = server.cpu_seconds(), time.process_time(), time.perf_counter()
            await asyncio.gather(*(_upload(mv, p, cap, slots) for p in paths[10:]))
            wall = time.perf_counter() - start
            used, client_used = server.cpu_seconds() - cpu, time.process_time() - client
            rows.append([str(at_once), str(files), f"{files / wall:.0f}",
                         f"{used / files * 1000:.1f}", f"{client_used / files * 1000:.1f}"])
    return rows


async def _upload(mv: AsyncClient, path: Path, cap: Capsule, slots: asyncio.Semaphore) -> None:
    async with slots:
        await mv.upload_file(path, cap)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=200,
                        help="small uploads to time (a multiple of 25; default 200)")
    parser.add_argument("--files", type=int, default=300,
                        help="100 KB files to upload through the SDK, per row (default 300)")
    args = parser.parse_args(argv)
    uploads = max(ROUND, args.uploads // ROUND * ROUND)
    work = Path(tempfile.mkdtemp(prefix="memvault-bench-requests-"))
    try:
        server, base = start_memvault(work / "data", "uvicorn")
        with server:
            token = read_token(work / "data")
            costs = asyncio.run(measure(server, base, token, uploads))
            files = asyncio.run(small_files(server, base, token, work, args.files))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\none request at a time, {uploads} small uploads (1000 bytes, one chunk each)")
    print_table(["request", "n", "wall ms", "server CPU ms"], costs.rows())
    print(f"\nsmall files through the SDK (upload_file, {SMALL_FILE // 1000} KB each: begin, "
          "one chunk, finish)")
    print_table(["at once", "files", "files/s", "server CPU ms/file", "client CPU ms/file"],
                files)
    given = sys.argv[1:] if argv is None else list(argv)
    print("\ncommand: " + shlex.join(["./run", "bench", "request_cost", *given]))


if __name__ == "__main__":
    main()
