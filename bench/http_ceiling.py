"""How fast the HTTP stack alone takes 8 MiB PUT bodies on loopback (no storage, no hashing).

Run as ``./run bench http_ceiling``. It serves apps that only drain the body (FastAPI,
Starlette, a raw ASGI callable) under uvicorn + httptools + uvloop (what ``memvault serve``
runs) and under granian (one worker), sends 128 x 8 MiB PUTs with 1 and 4 in flight from one
httpx client, and prints MB/s: the ceiling any upload server built on each stack can reach on
this machine, before it stores or hashes a byte.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from _common import ServerProcess, free_port, print_table, python_argv

CHUNK = 8 * 1024 * 1024
COUNT = 128


def _send(url: str, in_flight: int, body: bytes) -> float:
    with httpx.Client(base_url=url, timeout=60,
                      limits=httpx.Limits(max_connections=in_flight)) as client:
        start = time.perf_counter()
        with ThreadPoolExecutor(in_flight) as pool:
            for response in pool.map(lambda i: client.put(f"/c/{i}", content=body),
                                     range(COUNT)):
                response.raise_for_status()
        return time.perf_counter() - start


def main() -> None:
    body = os.urandom(CHUNK)
    rows = []
    here = Path(__file__).parent
    for server in ("uvicorn", "granian"):
        for app in ("fastapi_app", "starlette_app", "raw_app"):
            port = free_port()
            if server == "uvicorn":
                argv = python_argv("-m", "uvicorn", "--app-dir", str(here), f"_drain_app:{app}",
                                   "--port", str(port), "--http", "httptools", "--loop",
                                   "uvloop", "--log-level", "warning")
            else:
                argv = python_argv("-m", "granian", "--interface", "asgi", "--host",
                                   "127.0.0.1", "--port", str(port), "--workers", "1",
                                   "--log-level", "warning", f"_drain_app:{app}")
            with ServerProcess(argv, f"http://127.0.0.1:{port}/c/0", cwd=here,
                               follow_child=server == "granian"):
                for in_flight in (1, 4):
                    seconds = _send(f"http://127.0.0.1:{port}", in_flight, body)
                    rows.append([server, app, in_flight, f"{COUNT * CHUNK / 1e6 / seconds:.0f}"])
    print_table(["server", "app", "in flight", "MB/s"], rows)
    print("command: ./run bench http_ceiling")


if __name__ == "__main__":
    main()
