"""End to end on S3: a real ``memvault serve`` process whose blobs go to a moto server.

Chunks are 5 MiB, S3's smallest part, so files here are a few parts long.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer
from tests.helpers import Api, problem
from tests.s3server import S3Server
from tests.test_e2e_derivatives import ROLES, jpeg, settled, upload

MiB = 1024 * 1024
PART = 5 * MiB
PREFIX = "srv"


def _env(s3: S3Server, bucket: str) -> dict[str, str]:
    # No reaper pass during a test: moto dates every multipart upload in 2010, so its staging
    # sweep would take an upload whose begin had not yet committed its session row.
    return {**s3.env(bucket, PREFIX), "MEMVAULT_CHUNK_SIZE": str(PART),
            "MEMVAULT_DERIVATIVE_WORKERS": "1", "MEMVAULT_REAPER_INTERVAL": "3600"}


@pytest.fixture(scope="module")
def s3_live(s3_server: S3Server,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, str]]:
    bucket = s3_server.new_bucket()
    server = LiveServer(tmp_path_factory.mktemp("s3srv") / "data", env=_env(s3_server, bucket))
    server.start()
    try:
        yield server, bucket
    finally:
        server.kill(15)


@pytest.fixture
def api(s3_live: tuple[LiveServer, str]) -> Iterator[Api]:
    client = s3_live[0].api()
    yield client
    client.http.close()


def test_parallel_out_of_order_upload_then_range_reads(
    api: Api, s3_live: tuple[LiveServer, str], s3_server: S3Server,
) -> None:
    server, bucket = s3_live
    data = os.urandom(4 * PART + 1000)
    cap = api.capsule()
    s = api.session(cap, len(data))
    assert (s["chunk_size"], s["chunk_count"]) == (PART, 5)
    order = list(range(5))
    random.Random(7).shuffle(order)

    def send(index: int) -> int:
        with httpx.Client(base_url=server.url, timeout=120,
                          headers={"Authorization": f"Bearer {server.token}"}) as http:
            return Api(http).put(s, index, data).status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(send, order)) == [200] * 5
    r = api.finish(s, data)
    assert r.status_code == 200, r.text
    memory_id = r.json()["memory_id"]
    assert api.read(memory_id).content == data
    for first, last in [(PART - 5, PART + 4), (0, 0), (3 * PART, len(data) - 1)]:
        r = api.read(memory_id, Range=f"bytes={first}-{last}")
        assert r.status_code == 206
        assert r.content == data[first:last + 1]
    assert r.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert s3_server.uploads(bucket, f"{PREFIX}/") == []
    assert f"{PREFIX}/{s['id']}" in s3_server.objects(bucket, f"{PREFIX}/")


def test_abort_releases_the_multipart_upload(
    api: Api, s3_live: tuple[LiveServer, str], s3_server: S3Server,
) -> None:
    _, bucket = s3_live
    data = os.urandom(PART + 1)
    s = api.session(api.capsule(), len(data))
    assert api.put(s, 0, data).status_code == 200
    mine = [u for u in s3_server.uploads(bucket, f"{PREFIX}/")
            if u["Key"] == f"{PREFIX}/{s['id']}"]
    assert len(mine) == 1
    assert api.http.delete(f"/v1/uploads/{s['id']}").status_code == 204
    assert [u for u in s3_server.uploads(bucket, f"{PREFIX}/")
            if u["Key"] == f"{PREFIX}/{s['id']}"] == []
    assert f"{PREFIX}/{s['id']}" not in s3_server.objects(bucket, f"{PREFIX}/")
    problem(api.put(s, 1, data), 404, "not_found")


def test_the_server_makes_derivatives_from_an_original_in_s3(api: Api) -> None:
    """Decoders get the original through a spooled local copy (no local path on S3)."""
    data = jpeg(900, 600)
    done = upload(api, api.capsule(), data, "image/jpeg")
    memory = settled(api, done["memory_id"])
    assert memory["derivatives"] == dict.fromkeys(ROLES, "ready")
    for role in ROLES:
        body = api.http.get(f"/v1/memories/{memory['id']}/assets/{role}").content
        assert body
        assert memory["assets"][role]["sha256"] == hashlib.sha256(body).hexdigest()
    assert api.read(done["memory_id"]).content == data


def test_readiness_reports_the_bucket(s3_live: tuple[LiveServer, str], s3_server: S3Server,
                                      tmp_path: Path) -> None:
    r = httpx.get(f"{s3_live[0].url}/readyz", timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["checks"]["blobs"] == "ok"
    # A bucket that is not there is found before the server starts, and said in one line.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMVAULT_")}
    done = subprocess.run(
        [sys.executable, "-m", "memvault", "serve", "--data", str(tmp_path / "data")],
        env={**env, **_env(s3_server, "mv-no-such-bucket")}, capture_output=True, text=True,
        timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()[-1:]
    assert line.startswith("memvault: s3://mv-no-such-bucket: ")


def test_64_mib_upload_to_s3_does_not_grow_server_memory(
    s3_server: S3Server, tmp_path: Path,
) -> None:
    """With 32 MiB chunks (parts), holding even one part in memory on its way to S3 would
    add 32 MiB to the peak: parts are spooled to disk and uploaded from the file."""
    env = {**_env(s3_server, s3_server.new_bucket()), "MEMVAULT_CHUNK_SIZE": str(32 * MiB),
           "MEMVAULT_S3_SPOOL_DIR": str(tmp_path / "spool")}
    server = LiveServer(tmp_path / "data", env=env)
    server.start()
    try:
        api = server.api()
        cap = api.capsule()
        api.upload(cap, os.urandom(6 * MiB))  # warm every code path (and a part upload) first
        baseline = server.rss_kib("VmHWM")
        data = os.urandom(64 * MiB)
        s = api.session(cap, len(data))
        assert s["chunk_size"] == 32 * MiB
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            assert list(pool.map(lambda i: api.put(s, i, data).status_code, [1, 0])) == [200] * 2
        assert api.finish(s, data).status_code == 200
        grown_mib = (server.rss_kib("VmHWM") - baseline) / 1024
        assert grown_mib < 12, f"server peak RSS grew by {grown_mib:.1f} MiB for a 64 MiB upload"
        api.http.close()
    finally:
        server.kill(15)


def test_sigkill_with_parts_past_a_gap_then_resume_and_finish(
    s3_server: S3Server, tmp_path: Path,
) -> None:
    """Chunks past a gap wait in the killed process's spool, which dies with it: the next
    process finishes by reading those parts back from the completed object, and removes the
    dead process's spool folder when it starts."""
    spool = tmp_path / "spool"
    env = {**_env(s3_server, s3_server.new_bucket()), "MEMVAULT_S3_SPOOL_DIR": str(spool)}
    server = LiveServer(tmp_path / "data", env=env)
    server.start()
    try:
        api = server.api()
        data = os.urandom(3 * PART + 99)
        s = api.session(api.capsule(), len(data))
        for index in (2, 1):  # both past the gap at chunk 0: kept in the spool
            assert api.put(s, index, data).status_code == 200
        dead = server.pid
        assert [p.name.split("-")[0] for p in spool.iterdir()] == [str(dead)]
        server.kill()
        api.http.close()
        server.start()
        assert [p.name.split("-")[0] for p in spool.iterdir()] == [str(server.pid)]
        api = server.api()
        status = api.http.get(f"/v1/uploads/{s['id']}").json()
        assert status["received"] == [1, 2]
        for index in (3, 0):
            assert api.put(s, index, data).status_code == 200
        r = api.finish(s, data)
        assert r.status_code == 200, r.text
        assert api.read(r.json()["memory_id"]).content == data
        log = server.log_path.read_text() if server.log_path else ""
        assert '"session.read_back"' in log
        api.http.close()
    finally:
        server.kill(15)


def test_blobs_check_finds_objects_gone_cut_short_or_changed_in_the_bucket(
    api: Api, s3_live: tuple[LiveServer, str], s3_server: S3Server,
) -> None:
    """``memvault blobs check`` on S3 (it refused, saying there was no folder to compare):
    each blob in use is looked up (HEAD), and with --verify read through and hashed."""
    server, bucket = s3_live
    cap = api.capsule()
    contents = {name: os.urandom(size) for name, size in
                (("intact", PART + 3), ("gone", 1000), ("cut", PART + 5), ("changed", 2000))}
    objects = {}
    for name, data in contents.items():
        s = api.session(cap, len(data))
        for index in range(s["chunk_count"]):
            assert api.put(s, index, data).status_code == 200
        assert api.finish(s, data).status_code == 200
        objects[name] = f"{PREFIX}/{s['id']}"

    def check(*extra: str) -> tuple[int, dict[str, Any]]:
        done = subprocess.run(
            [sys.executable, "-m", "memvault", "blobs", "check", "--data",
             str(server.data_dir), "--json", *extra],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, **_env(s3_server, bucket)})
        return done.returncode, json.loads(done.stdout)

    code, report = check("--verify")
    assert code == 0, report
    assert report["in_use"] >= 4  # and the blobs of the module's other tests
    assert report["verified"] == report["in_use"]

    s3 = s3_server.client()
    s3.delete_object(Bucket=bucket, Key=objects["gone"])
    s3.put_object(Bucket=bucket, Key=objects["cut"], Body=contents["cut"][:PART])
    s3.put_object(Bucket=bucket, Key=objects["changed"], Body=os.urandom(2000))

    def sha(name: str) -> str:
        return hashlib.sha256(contents[name]).hexdigest()

    code, report = check()
    assert code == 1
    assert [m["sha256"] for m in report["missing"]] == [sha("gone")]
    assert [(d["sha256"], d["stored_size"], d["size"]) for d in report["damaged"]] == [
        (sha("cut"), PART, PART + 5)]
    assert report["corrupt"] == []
    assert report["verified"] is None

    code, report = check("--verify")
    assert code == 1
    assert [c["sha256"] for c in report["corrupt"]] == [sha("changed")]
    assert report["verified"] == report["in_use"] - 2  # all but the gone and the cut one

    # A bucket that is not there is said so (exit 2), not every blob reported missing.
    done = subprocess.run(
        [sys.executable, "-m", "memvault", "blobs", "check", "--data", str(server.data_dir)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, **_env(s3_server, bucket),
             "MEMVAULT_BLOB_STORE": f"s3://{bucket}-not-there/{PREFIX}"})
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert f"s3://{bucket}-not-there" in done.stderr
    assert "missing" not in done.stdout
