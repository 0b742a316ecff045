"""What an operator sees when something is wrong before the server can start, or around it.

Each case is the real ``memvault`` command as a subprocess. Found by a review (2026-11-24):
broken settings that started a server unable to take uploads, tracebacks instead of one
sentence, a database from a newer version called "out of date", two processes migrating a
fresh folder at once, an admin token written into a stray file's mode, a mistyped ``--data``
quietly becoming an empty vault, a password in the start-up log, and ``/readyz`` answering
ready with the blob folders gone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from memvault.settings import TRANSFER_MEMORY, Settings, _default_transfer_slots, _usable_memory
from tests.conftest import LiveServer, free_port
from tests.helpers import one_sentence, problem
from tests.inprocess import inprocess


def memvault(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMVAULT_")}
    return subprocess.run([sys.executable, "-m", "memvault", *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_transfer_slots_follow_a_container_memory_limit(tmp_path: Path) -> None:
    physical = _usable_memory(limits=[])
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    v2.write_text("max\n")
    v1.write_text("9223372036854771712\n")  # cgroup v1's "no limit"
    assert _usable_memory(limits=[v2, v1, tmp_path / "absent"]) == physical
    v2.write_text(f"{512 * 1024 * 1024}\n")
    assert _usable_memory(limits=[v2, v1]) == 512 * 1024 * 1024
    # 512 MiB: 64 slots at most, so their write batches take at most a quarter of it.
    assert _default_transfer_slots(512 * 1024 * 1024) == min(64, 32 * (os.cpu_count() or 1))
    assert _default_transfer_slots(16 * 1024 * 1024) == 4  # never fewer than four
    assert 4 * Settings().write_batch <= TRANSFER_MEMORY


@pytest.mark.parametrize(("name", "value"), [
    ("CHUNK_SIZE", "0"), ("MIN_CHUNK_SIZE", "-5"), ("MAX_UPLOAD_SIZE", "-1"),
    ("MAX_CHUNK_COUNT", "0"), ("PORT", "99999"), ("BLOB_STORE", "s3://"),
    ("TRANSFER_SLOTS_PER_PRINCIPAL", "0"), ("SESSION_TTL", "0"),
])
def test_settings_that_cannot_work_are_refused_in_one_sentence(
        tmp_path: Path, name: str, value: str) -> None:
    line = one_sentence(memvault("serve", "--data", str(tmp_path / "d"),
                                 **{f"MEMVAULT_{name}": value}))
    assert f"MEMVAULT_{name}" in line
    assert not (tmp_path / "d").exists()


def test_an_unreachable_database_is_one_sentence_with_no_password(tmp_path: Path) -> None:
    pytest.importorskip("asyncpg")
    line = one_sentence(memvault(
        "serve", "--data", str(tmp_path / "d"),
        MEMVAULT_DATABASE_URL="postgresql+asyncpg://memvault:S3cretPW@127.0.0.1:1/memvault",
        MEMVAULT_AUTO_MIGRATE="true"))
    assert "cannot use the database at postgresql+asyncpg://memvault:***@127.0.0.1:1" in line
    assert "S3cretPW" not in line
    # What is logged on the way is in the format asked for, on stderr (it was the console
    # format on stdout, whatever MEMVAULT_LOG_FORMAT said).
    done = memvault("serve", "--data", str(tmp_path / "d"),
                    MEMVAULT_DATABASE_URL="postgresql+asyncpg://memvault:pw@127.0.0.1:1/m",
                    MEMVAULT_LOG_FORMAT="json")
    logged = [json.loads(x) for x in done.stderr.splitlines() if x.startswith("{")]
    assert "database.unreachable" in {entry["event"] for entry in logged}, done.stderr
    assert done.stdout == ""


def test_a_data_folder_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    for args, env in [(("serve", "--data", str(path)), {}),
                      (("serve",), {"MEMVAULT_DATA_DIR": str(path)})]:
        assert "is a file" in one_sentence(memvault(*args, **env))


def test_a_database_from_a_newer_version_is_said_to_be_so(tmp_path: Path) -> None:
    data = tmp_path / "d"
    assert memvault("db", "upgrade", "--data", str(data)).returncode == 0
    with sqlite3.connect(data / "memvault.db") as db:
        db.execute("UPDATE alembic_version SET version_num = 'from_the_future'")
    for args in (("serve", "--data", str(data)), ("db", "upgrade", "--data", str(data)),
                 ("blobs", "check", "--data", str(data))):
        line = one_sentence(memvault(*args))
        assert "written by a newer memvault" in line, args
        assert "from_the_future" in line


def test_commands_on_a_mistyped_data_folder_do_not_make_a_new_vault(tmp_path: Path) -> None:
    missing = tmp_path / "typo"
    for args in (("blobs", "check", "--data", str(missing)),
                 ("token", "create", "bob", "--data", str(missing)),
                 ("worker", "--data", str(missing), "--processes", "1")):
        line = one_sentence(memvault(*args))
        assert "no memvault database in" in line
    assert not missing.exists()


def test_two_processes_migrating_a_fresh_folder_at_once_both_succeed(tmp_path: Path) -> None:
    for trial in range(3):
        data = tmp_path / f"d{trial}"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMVAULT_")}
        procs = [subprocess.Popen([sys.executable, "-m", "memvault", "db", "upgrade",
                                   "--data", str(data)], env=clean, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err


def test_the_admin_token_file_is_new_and_private_even_over_a_stray_one(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    stray = data / "admin.token"
    stray.write_text("old token of a former vault\n")
    stray.chmod(0o644)
    server = LiveServer(data)
    server.start()
    try:
        mode = stat.S_IMODE((data / "admin.token").stat().st_mode)
        assert mode == 0o600
        token = (data / "admin.token").read_text().strip()
        assert token != "old token of a former vault"
        r = httpx.get(f"{server.url}/v1/capsules", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        assert not list(data.glob("admin.token.*"))
    finally:
        server.kill()


def test_readyz_is_503_when_the_blob_folders_are_gone(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "d")
    server.start()
    try:
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        shutil.rmtree(tmp_path / "d" / "staging")
        body = problem(httpx.get(f"{server.url}/readyz"), 503, "unavailable")
        assert "staging" in body["checks"]["blobs"]
        (tmp_path / "d" / "staging").mkdir()
        assert httpx.get(f"{server.url}/readyz").status_code == 200
    finally:
        server.kill()


def test_no_password_is_shown_in_the_settings_in_force() -> None:
    settings = Settings(
        database_url="postgresql+asyncpg://memvault:S3cretPW@db/memvault",
        listen_database_url="postgresql://memvault:L1stenPW@db:5432/memvault?password=Q3ryPW")
    shown = str(settings.effective())
    for secret in ("S3cretPW", "L1stenPW", "Q3ryPW"):
        assert secret not in shown
    assert "memvault:***@db" in shown


def test_a_new_data_folder_is_for_the_service_user_alone(tmp_path: Path) -> None:
    data = tmp_path / "d"
    server = LiveServer(data)
    server.start()
    try:
        assert httpx.post(f"{server.url}/v1/capsules", json={"name": "x"},
                          headers={"Authorization": f"Bearer {server.token}"}).status_code == 201
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        for name in ("memvault.db", "memvault.db-wal", "admin.token"):
            if (data / name).exists():
                assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
        assert (data / "memvault.db-wal").exists()
    finally:
        server.kill()


def test_blobs_check_with_the_bucket_unreachable_is_one_sentence(
        tmp_path: Path) -> None:
    """On S3 ``blobs check`` looks each blob up; a store that does not answer is said in one
    line (exit 2), not a traceback."""
    data = tmp_path / "d"
    data.mkdir()

    async def one_blob() -> None:
        async with inprocess(root=data) as ip:
            content = os.urandom(1000)
            session_id = await ip.sent(content, "k")
            await ip.uploads.finish(ip.caller, session_id, len(content),
                                    hashlib.sha256(content).hexdigest())

    asyncio.run(one_blob())
    line = one_sentence(memvault(
        "blobs", "check", "--data", str(data), MEMVAULT_BLOB_STORE="s3://bucket/prefix",
        MEMVAULT_S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",  # nobody listens
        AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y"))
    assert line.startswith("memvault: s3://bucket: ")  # the bucket is looked at first
    assert "Could not connect" in line


def test_an_sqlite_file_of_another_name_in_the_data_folder_is_the_database(
        tmp_path: Path) -> None:
    data = tmp_path / "d"
    env = {"MEMVAULT_DATABASE_URL": f"sqlite:///{data / 'vault.db'}"}
    assert memvault("db", "upgrade", "--data", str(data), **env).returncode == 0
    assert not (data / "memvault.db").exists()
    assert stat.S_IMODE((data / "vault.db").stat().st_mode) == 0o600
    done = memvault("token", "create", "bob", "--data", str(data), **env)
    assert done.returncode == 0, done.stderr
    assert memvault("blobs", "check", "--data", str(data), **env).returncode == 0
