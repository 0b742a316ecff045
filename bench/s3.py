"""Upload benchmark on the S3 blob store: memvault serve → moto on 127.0.0.1, in one run.

Run as ``./run bench s3 [options]``. It starts a moto S3 server and ``memvault serve`` with
``MEMVAULT_BLOB_STORE=s3://…`` itself, uploads a file (default 1 GiB) through memvault's API
with 1, 4 and 8 chunks in flight (default settings: 8 MiB chunks = 8 MiB parts), and prints
MB/s (begin → every chunk → finish), finish latency, the server's peak RSS above idle
(VmHWM, reset before each upload) and the most bytes its part spool held on disk (sampled
every 20 ms). For scale it also uploads the same file straight to moto with boto3's
multipart calls from as many threads, no memvault in between.

moto is a Python mock that keeps every byte in its own memory and parses each request in
Python: what these figures measure is moto on this machine, not S3. They show the cost
memvault adds on top of the object store, and that memory stays flat; they say nothing
about AWS's throughput.

With ``--postgres URL`` (a server it may create a database on) the metadata goes to a fresh
PostgreSQL database instead of SQLite, and ``--processes 1,2`` runs the uploads against that
many ``memvault serve`` processes at once (each with its own data folder and spool, chunks sent
round-robin, as behind a load balancer); it then also prints the metadata work per chunk that
PostgreSQL counted (transactions and rows written, from ``pg_stat_database``).

Examples::

    ./run bench s3                        # 1 GiB at 1, 4 and 8 in flight
    ./run bench s3 --size 256M --in-flight 4
    ./run bench s3 --postgres postgresql://postgres@127.0.0.1:5432/test --processes 1,2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import httpx

from _common import (
    GiB,
    MiB,
    ServerProcess,
    free_port,
    make_file,
    mb_per_s,
    parse_size,
    print_table,
    python_argv,
)
from upload import Api, Source, read_token

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "memvault-bench",
    "AWS_SECRET_ACCESS_KEY": "memvault-bench-secret",
    "AWS_EC2_METADATA_DISABLED": "true",  # never look past the environment for credentials
}
REGION = "us-east-1"
PREFIX = "bench"


@contextmanager
def moto_server() -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = python_argv("-m", "moto.server", "-H", "127.0.0.1", "-p", str(port))
    with ServerProcess(argv, f"{url}/moto-api/", env=CREDENTIALS):
        yield url


def s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


class SpoolWatch:
    """Samples the bytes under a folder every 20 ms in a thread; ``peak`` is the most seen."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            total = 0
            for path in self.root.rglob("*"):
                try:
                    total += path.stat().st_size if path.is_file() else 0
                except FileNotFoundError:
                    continue
            self.peak = max(self.peak, total)

    def __enter__(self) -> SpoolWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def clear(client: Any, bucket: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])


def direct_upload(client: Any, bucket: str, src: Source, part: int,
                  threads: int) -> tuple[float, float]:
    """The file straight to moto as a multipart upload, ``threads`` parts at a time: seconds
    in all, and for CompleteMultipartUpload alone."""
    key = f"direct/{secrets.token_hex(8)}"
    started = time.perf_counter()
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    count = -(-src.size // part)

    def one(index: int) -> dict[str, Any]:
        offset = index * part
        body = src.read(offset, min(part, src.size - offset))
        answer = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                    PartNumber=index + 1, Body=body)
        return {"PartNumber": index + 1, "ETag": answer["ETag"]}

    with ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(one, range(count)))
    completing = time.perf_counter()
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                     MultipartUpload={"Parts": parts})
    done = time.perf_counter()
    client.delete_object(Bucket=bucket, Key=key)
    return done - started, done - completing


class RoundRobin(httpx.BaseTransport):
    """Sends request i to server i mod N (a load balancer without sticky sessions)."""

    def __init__(self, ports: list[int], pool: int) -> None:
        self.ports = ports
        self.next = 0
        self.lock = threading.Lock()
        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        self.inner = {port: httpx.HTTPTransport(limits=limits) for port in ports}

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            port = self.ports[self.next % len(self.ports)]
            self.next += 1
        request.url = request.url.copy_with(port=port)
        return self.inner[port].handle_request(request)

    def close(self) -> None:
        for transport in self.inner.values():
            transport.close()


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A fresh database on the server at ``admin_url`` (an asyncpg URL for memvault)."""
    import asyncio

    import asyncpg

    name = f"mvbench_{secrets.token_hex(4)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE "{name}" WITH (FORCE)'))


def pg_counters(database_url: str) -> tuple[int, int]:
    """Transactions (commits + rollbacks) and rows written so far in the database.

    Waits first: other backends report their counts to pg_stat_database only when they have
    been idle for a while (up to 10 s), so an immediate read would miss the last ones.
    """
    import asyncio

    import asyncpg

    time.sleep(11)

    async def read() -> tuple[int, int]:
        conn = await asyncpg.connect(database_url.replace("+asyncpg", ""))
        try:
            row = await conn.fetchrow(
                "SELECT xact_commit + xact_rollback AS tx, "
                "tup_inserted + tup_updated + tup_deleted AS rows "
                "FROM pg_stat_database WHERE datname = current_database()")
            return int(row["tx"]), int(row["rows"])
        finally:
            await conn.close()

    return asyncio.run(read())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="file size (default 1G)")
    parser.add_argument("--in-flight", default="1,4,8", help="chunks in flight, comma-separated")
    parser.add_argument("--postgres", help="PostgreSQL admin URL: metadata there, not SQLite")
    parser.add_argument("--processes", default="1", help="server processes, comma-separated")
    args = parser.parse_args(argv)
    if args.postgres is None and args.processes != "1":
        parser.error("--processes above 1 needs --postgres (SQLite is one machine's)")
    size = parse_size(args.size)
    flights = [int(x) for x in args.in_flight.split(",")]
    os.environ.update(CREDENTIALS)
    with tempfile.TemporaryDirectory(prefix="memvault-bench-s3-") as tmp, moto_server() as url:
        work = Path(tmp)
        client = s3_client(url)
        bucket = f"mv-bench-{secrets.token_hex(4)}"
        client.create_bucket(Bucket=bucket)
        path = work / "file.bin"
        make_file(path, size)
        src = Source(path, size)
        rows: list[list[object]] = []
        meta_rows: list[list[object]] = []
        idle = 0
        for processes in [int(x) for x in args.processes.split(",")]:
            with contextlib.ExitStack() as stack:
                database = (stack.enter_context(postgres_database(args.postgres))
                            if args.postgres else None)
                label = (f"memvault x{processes} (PostgreSQL) → moto" if database
                         else "memvault → moto")
                servers, ports = [], []
                for node in range(processes):
                    port = free_port()
                    env = {
                        **CREDENTIALS,
                        "MEMVAULT_BLOB_STORE": f"s3://{bucket}/{PREFIX}",
                        "MEMVAULT_S3_ENDPOINT_URL": url,
                        "MEMVAULT_S3_REGION": REGION,
                        "MEMVAULT_S3_SPOOL_DIR": str(work / "spool" / f"node{node}"),
                        "MEMVAULT_DERIVATIVE_WORKERS": "0",
                        "MEMVAULT_LOG_LEVEL": "warning",
                        **({"MEMVAULT_DATABASE_URL": database,
                            "MEMVAULT_AUTO_MIGRATE": "true"} if database else {}),
                    }
                    serve = python_argv("-m", "memvault", "serve", "--data",
                                        str(work / f"data{node}"), "--host", "127.0.0.1",
                                        "--port", str(port))
                    servers.append(stack.enter_context(
                        ServerProcess(serve, f"http://127.0.0.1:{port}/healthz", env=env)))
                    ports.append(port)
                api = Api(f"http://127.0.0.1:{ports[0]}", read_token(work / "data0"),
                          pool=max(flights), transport=RoundRobin(ports, max(flights)))
                capsule = api.capsule()
                idle = servers[0].rss_kib()
                with ThreadPoolExecutor(max(flights)) as pool:
                    for n, in_flight in enumerate(flights):
                        src.next_variant()
                        for server in servers:
                            server.reset_hwm()
                        before = pg_counters(database) if database else (0, 0)
                        with SpoolWatch(work / "spool") as watch:
                            timing = api.upload(capsule, src, in_flight, pool)
                        after = pg_counters(database) if database else (0, 0)
                        hwm = max(server.hwm_kib() for server in servers)
                        if n == 0:
                            got, sha, _ = api.read_back(timing.memory_id)
                            if (got, sha) != (size, src.sha256):
                                raise SystemExit(f"read back {got} bytes, sha256 {sha}: wrong")
                        clear(client, bucket)  # moto keeps objects in memory
                        rows.append([
                            label, in_flight, f"{mb_per_s(size, timing.seconds):.0f}",
                            f"{timing.finish_s * 1000:.0f}", f"{(hwm - idle) / 1024:.0f}",
                            f"{watch.peak / MiB:.0f}",
                        ])
                        if database:
                            chunks = len(timing.chunk_s)
                            meta_rows.append([
                                label, in_flight, chunks,
                                f"{(after[0] - before[0]) / chunks:.1f}",
                                f"{(after[1] - before[1]) / chunks:.1f}",
                            ])
                api.close()
        for in_flight in flights:
            seconds, complete = direct_upload(client, bucket, src, 8 * MiB, in_flight)
            rows.append(["boto3 → moto (no memvault)", in_flight,
                         f"{mb_per_s(size, seconds):.0f}", f"({complete * 1000:.0f})", "-", "-"])
        src.close()
    print(f"\n{size / GiB:g} GiB file, 8 MiB chunks/parts; moto {moto_version()}, "
          f"idle server RSS {idle / 1024:.0f} MiB\n")
    print_table(["path", "in flight", "MB/s", "finish ms", "peak - idle RSS MiB",
                 "spool peak MiB"], rows)
    if meta_rows:
        print_table(["servers", "in flight", "chunks", "PostgreSQL tx per chunk",
                     "rows written per chunk"], meta_rows)
        print("(tx and rows from pg_stat_database over the whole upload: begin, every chunk,"
              " finish and the read-back, divided by the chunks)")
    print("\n(finish ms) of boto3 rows: CompleteMultipartUpload alone, for comparison.")
    print("These figures measure moto (a Python mock holding every byte in memory), not S3.")


def moto_version() -> str:
    from importlib import metadata

    return metadata.version("moto")


if __name__ == "__main__":
    main()
