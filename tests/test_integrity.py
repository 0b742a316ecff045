"""Stored bytes that are not what was recorded, and a server that cannot write: each found by
a failure-injection review, and each seen here through the real commands and servers.

- ``memvault blobs check`` said "everything matches" over a blob file truncated or grown
  behind the server's back; it now compares sizes, and ``--verify`` hashes every byte again.
- GET/HEAD of such an asset answered 200 with the recorded Content-Length and cut the
  body at the real end (a Range past it: a bare 500); now a 500 that says what is wrong,
  before any byte.
- ``/readyz`` said ready while no write could succeed (full volume, read-only database);
  it now makes a write. A server does not start on a database it cannot write.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from memvault.storage.base import BlobDamaged
from memvault.storage.s3 import S3BlobStore, S3Location, S3Options
from tests.conftest import SMALL_CHUNKS, LiveServer
from tests.helpers import Api, one_sentence, problem, unprivileged
from tests.s3server import REGION, S3Server

MiB = 1024 * 1024


def _blob(data_dir: Path, data: bytes) -> Path:
    sha = hashlib.sha256(data).hexdigest()
    return data_dir / "blobs" / sha[:2] / sha[2:4] / sha


def _check(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMVAULT_")}
    return subprocess.run([sys.executable, "-m", "memvault", "blobs", "check", "--data",
                           str(data_dir), *args], env=clean, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[LiveServer, Api]]:
    server = LiveServer(tmp_path / "data", env={**SMALL_CHUNKS,
                                                "MEMVAULT_DERIVATIVE_WORKERS": "0"})
    server.start()
    api = server.api()
    try:
        yield server, api
    finally:
        api.http.close()
        server.kill()


# -- reads --------------------------------------------------------------------------------


def test_an_asset_whose_file_is_another_size_is_a_500_before_any_byte(
        live: tuple[LiveServer, Api]) -> None:
    server, api = live
    data = os.urandom(3 * 256 * 1024 + 17)
    memory = api.upload(api.capsule(), data)["memory_id"]
    path = _blob(server.data_dir, data)
    url = f"/v1/memories/{memory}/assets/original"

    for damage, on_disk in [("truncated", len(data) // 2), ("grown", len(data) + 5)]:
        path.write_bytes((data + b"extra")[:on_disk])
        expected = (f"stored bytes of the original of memory {memory} are damaged: "
                    f"{on_disk} bytes on disk, {len(data)} expected")
        for headers in [{}, {"Range": f"bytes={len(data) - 10}-"}, {"Range": "bytes=0-9"}]:
            body = problem(api.http.get(url, headers=headers), 500, "internal")
            assert body["detail"].startswith(expected), (damage, headers, body)
        head = api.http.head(url)
        assert head.status_code == 500, damage
        assert head.headers["content-type"].startswith("application/problem+json")

    path.write_bytes(data)  # restored from a backup: served again
    assert api.read(memory).content == data
    assert api.http.head(url).status_code == 200
    ranged = api.read(memory, Range=f"bytes={len(data) - 10}-")
    assert (ranged.status_code, ranged.content) == (206, data[-10:])


async def test_an_s3_object_of_another_size_is_damaged_not_served(
        s3_server: S3Server, tmp_path: Path) -> None:
    """The S3 store checks the object's whole length (the ranged GET's Content-Range, or a
    HEAD for an empty read) against the recorded size; nothing of it is read."""
    store = S3BlobStore(S3Location(s3_server.new_bucket(), "integrity/"),
                        S3Options(endpoint_url=s3_server.endpoint_url, region=REGION,
                                  spool_dir=tmp_path / "spool", attempts=2))
    await store.open()
    try:
        name = "ses_0123456789abcdef"
        await store.client.put_object(Bucket=store.location.bucket, Key=f"integrity/{name}",
                                      Body=b"x" * 100)
        assert b"".join([p async for p in store.read(name, 0, 100, size=100)]) == b"x" * 100
        for start, end in [(0, 10), (0, 0), (150, 199)]:
            with pytest.raises(BlobDamaged) as caught:
                async for _ in store.read(name, start, end, size=200):
                    pass
            assert caught.value.sizes == "100 bytes in the bucket, 200 expected"
    finally:
        await store.close()


# -- memvault blobs check ------------------------------------------------------------------


def test_blobs_check_reports_files_of_another_size_and_verify_finds_changed_bytes(
        live: tuple[LiveServer, Api]) -> None:
    server, api = live
    cap = api.capsule()
    kept, short, long, flipped = (os.urandom(256 * 1024 + n) for n in (1, 2, 3, 4))
    ids = {name: api.upload(cap, data)["memory_id"]
           for name, data in [("kept", kept), ("short", short), ("long", long),
                              ("flipped", flipped)]}
    sha = {name: hashlib.sha256(data).hexdigest()
           for name, data in [("kept", kept), ("short", short), ("long", long),
                              ("flipped", flipped)]}

    clean = _check(server.data_dir, "--verify")
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.splitlines() == ["4 blob files, 4 blobs in use",
                                         "4 blobs read through and hashed again",
                                         "everything matches"]

    _blob(server.data_dir, short).write_bytes(short[:1000])
    with _blob(server.data_dir, long).open("ab") as f:
        f.write(b"appended")
    changed = bytearray(flipped)
    changed[12345] ^= 0x01
    _blob(server.data_dir, flipped).write_bytes(bytes(changed))

    damaged = [
        {"sha256": sha["short"], "memory_id": ids["short"], "role": "original",
         "stored_size": 1000, "size": len(short)},
        {"sha256": sha["long"], "memory_id": ids["long"], "role": "original",
         "stored_size": len(long) + 8, "size": len(long)},
    ]
    damaged.sort(key=lambda d: str(d["sha256"]))
    done = _check(server.data_dir, "--json")
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout) == {
        "files": 4, "in_use": 4, "registered": [], "missing": [], "damaged": damaged,
        "verified": None, "corrupt": []}

    done = _check(server.data_dir, "--json", "--verify")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["damaged"] == damaged
    assert report["verified"] == 2  # the two of the right size; the others are reported
    assert report["corrupt"] == [{
        "sha256": sha["flipped"], "memory_id": ids["flipped"], "role": "original",
        "stored_sha256": hashlib.sha256(changed).hexdigest()}]

    done = _check(server.data_dir, "--verify")
    assert done.returncode == 1
    assert "everything matches" not in done.stdout
    assert (f"damaged: the original of memory {ids['short']} (blob {sha['short']}) has "
            f"1000 bytes on disk, {len(short)} expected") in done.stderr
    assert f"corrupt: the original of memory {ids['flipped']}" in done.stderr
    assert ids["kept"] not in done.stderr


def test_verify_streams_a_large_blob_in_flat_memory(tmp_path: Path) -> None:
    """Reading every byte of a 256 MiB blob costs the check no more memory than not."""
    server = LiveServer(tmp_path / "data", env={"MEMVAULT_DERIVATIVE_WORKERS": "0"})
    server.start()
    api = server.api()
    try:
        data = os.urandom(256 * MiB)
        api.upload(api.capsule(), data)
    finally:
        api.http.close()
        server.kill()
    del data

    def peak_kib(*args: str) -> int:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMVAULT_")}
        proc = subprocess.Popen([sys.executable, "-m", "memvault", "blobs", "check", "--data",
                                 str(server.data_dir), *args], env=clean,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0
        return int(usage.ru_maxrss)

    looked, verified = peak_kib(), peak_kib("--verify")
    assert verified - looked < 32 * 1024, (looked, verified)


# -- readiness and start-up ----------------------------------------------------------------


def test_readyz_is_503_when_the_staging_folder_is_a_file(
        live: tuple[LiveServer, Api]) -> None:
    server, _ = live
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    staging = server.data_dir / "staging"
    shutil.rmtree(staging)
    staging.write_bytes(b"not a folder")
    body = problem(httpx.get(f"{server.url}/readyz"), 503, "unavailable")
    assert "staging" in body["checks"]["blobs"]
    staging.unlink()
    staging.mkdir()
    assert httpx.get(f"{server.url}/readyz").status_code == 200


_CLONE_NEWNS = 0x00020000
_MS_REC, _MS_PRIVATE = 0x4000, 0x40000


def _own_small_volume(path: Path, size: str) -> None:
    """In the child, before exec: a mount namespace of its own, with a tmpfs of ``size``
    on ``path`` (a volume that can fill up, seen by no other process)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.unshare(_CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    if libc.mount(b"tmpfs", str(path).encode(), b"tmpfs", 0,
                  f"size={size},mode=0700".encode()) != 0:
        raise OSError(ctypes.get_errno(), "mount tmpfs")


def _can_mount() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    return subprocess.run([unshare, "-m", "sh", "-c",
                           "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null"],
                          capture_output=True, check=False).returncode == 0


def _fill(path: Path) -> None:
    """Write ``path`` until its volume is full."""
    with path.open("wb") as f:
        for _ in range(1024):
            try:
                f.write(b"\0" * MiB)
                f.flush()
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    return
                raise
    raise AssertionError(f"{path}'s volume did not fill up")


def test_readyz_is_503_on_a_full_volume_though_every_folder_looks_writable(
        tmp_path: Path) -> None:
    """The server's data folder is a 16 MiB volume of its own, filled up from outside (via
    /proc/PID/root, the server's view of the mounts). Every folder is still there and
    writable by mode, which is all readiness used to look at."""
    if not _can_mount():
        pytest.skip("needs to mount a tmpfs in a mount namespace of its own "
                    "(root, or CAP_SYS_ADMIN)")
    data = tmp_path / "data"
    data.mkdir()
    server = LiveServer(data, env={"MEMVAULT_DERIVATIVE_WORKERS": "0",
                                   "MEMVAULT_STORAGE_RESERVE": "0"},
                        preexec=lambda: _own_small_volume(data, "16m"))
    server.start()
    try:
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        seen = Path(f"/proc/{server.pid}/root") / str(data).lstrip("/")
        assert (seen / "memvault.db").exists()
        assert not (data / "memvault.db").exists()  # the volume is the server's alone
        filler = seen / "filler"
        _fill(filler)
        time.sleep(1.1)  # the last probe's outcome is kept for a second
        body = problem(httpx.get(f"{server.url}/readyz"), 503, "unavailable")
        assert body["checks"]["blobs"].startswith("not writable: "), body
        assert "No space left on device" in body["checks"]["blobs"]
        assert not [p for p in (seen / "staging").iterdir()]  # no probe file left behind

        filler.unlink()
        time.sleep(1.1)
        assert httpx.get(f"{server.url}/readyz").status_code == 200
    finally:
        server.kill()


def test_readyz_is_503_when_postgresql_takes_no_writes(postgres_url: str,
                                                       tmp_path: Path) -> None:
    """A database that answers reads but refuses writes (here: default read-only
    transactions, as on a standby a failover left the servers pointed at)."""
    import asyncio

    import asyncpg
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    name = url.database
    admin_url = url.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False)

    async def admin(*sql: str) -> None:
        conn = await asyncpg.connect(admin_url, timeout=5)
        try:
            for statement in sql:
                await conn.execute(statement)
        finally:
            await conn.close()

    terminate = (f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                 f"WHERE datname = '{name}' AND pid <> pg_backend_pid()")
    server = LiveServer(tmp_path / "data", env={
        "MEMVAULT_DATABASE_URL": postgres_url, "MEMVAULT_AUTO_MIGRATE": "true",
        "MEMVAULT_DERIVATIVE_WORKERS": "0"})
    server.start()
    try:
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        asyncio.run(admin(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on',
                          terminate))
        time.sleep(1.1)
        deadline = time.monotonic() + 10
        while True:  # the pool's connections were cut: the first poll may see that
            r = httpx.get(f"{server.url}/readyz")
            if r.status_code == 503 and "not writable" in r.json()["checks"]["metadata"]:
                break
            assert time.monotonic() < deadline, r.text
            time.sleep(0.3)
        assert "read-only transaction" in r.json()["checks"]["metadata"]
        assert r.json()["checks"]["blobs"] == "ok"

        asyncio.run(admin(f'ALTER DATABASE "{name}" RESET default_transaction_read_only',
                          terminate))
        time.sleep(1.1)
        deadline = time.monotonic() + 10
        while (r := httpx.get(f"{server.url}/readyz")).status_code != 200:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.3)
    finally:
        server.kill()


def test_a_read_only_database_file_is_refused_at_start_in_one_sentence(tmp_path: Path) -> None:
    data = tmp_path / "d"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMVAULT_")}
    memvault = [sys.executable, "-m", "memvault"]
    subprocess.run([*memvault, "db", "upgrade", "--data", str(data)], env=clean, check=True,
                   capture_output=True, timeout=120)
    (data / "memvault.db").chmod(0o444)  # the folder stays writable
    for command in (["serve", "--port", "0"], ["worker", "--processes", "1"]):
        done = subprocess.run(unprivileged([*memvault, *command, "--data",
                                                     str(data)]),
                              env=clean, capture_output=True, text=True, timeout=120,
                              check=False)
        assert one_sentence(done) == (
            f"memvault: cannot use the database at sqlite:///{data}/memvault.db"
            ": attempt to write a readonly database"), command
