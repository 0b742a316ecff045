"""Server-side derivatives against a live server: the 4-asset memory, bad input, a crash.

The server's job runner decodes in separate processes; these tests only look at what a user
sees through the API: per-role status moving to ``ready`` (or ``unsupported`` with the
reason), the four assets, the ThumbHash, and the original untouched.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from memvault.clock import SystemClock
from memvault.jobs.queue import JobQueue
from memvault.metadata import Database
from tests.conftest import SMALL_CHUNKS, LiveServer
from tests.helpers import Api, settled

ROLES = ("display", "thumb", "placeholder")


def jpeg(width: int, height: int) -> bytes:
    image = Image.new("RGB", (width, height))
    image.paste((200, 40, 40), (0, 0, width // 2, height // 2))  # a marked corner
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def upload(api: Api, capsule: str, data: bytes, content_type: str) -> dict[str, Any]:
    s = api.session(capsule, len(data), content_type=content_type)
    for i in range(s["chunk_count"]):
        assert api.put(s, i, data).status_code == 200
    r = api.finish(s, data)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


@pytest.fixture
def api(server: LiveServer) -> Iterator[Api]:
    client = server.api()
    yield client
    client.http.close()


def test_the_server_makes_display_thumb_and_placeholder(api: Api) -> None:
    data = jpeg(1200, 800)
    capsule = api.capsule()
    done = upload(api, capsule, data, "image/jpeg")
    memory = settled(api, done["memory_id"])
    assert memory["derivatives"] == dict.fromkeys(ROLES, "ready")
    assert memory["derivatives_reason"] is None
    assert set(memory["assets"]) == {"original", *ROLES}
    assert memory["thumbhash"]
    sizes = {}
    for role in ROLES:
        body = api.http.get(f"/v1/memories/{memory['id']}/assets/{role}").content
        with Image.open(io.BytesIO(body)) as image:
            sizes[role] = image.size
            assert "exif" not in image.info
    assert sizes["display"] == (1200, 800)  # fits in 1920x1080 already: never upscaled
    assert max(sizes["thumb"]) == 300
    assert max(sizes["placeholder"]) <= 32
    original = api.http.get(f"/v1/memories/{memory['id']}/assets/original").content
    assert hashlib.sha256(original).digest() == hashlib.sha256(data).digest()
    listed = api.http.get(f"/v1/capsules/{capsule}/memories").json()["items"]
    assert listed[0]["derivatives"] == dict.fromkeys(ROLES, "ready")


def test_not_an_image_is_unsupported_and_the_original_stays(api: Api) -> None:
    data = b"%PDF-1.7\n" + os.urandom(5000)
    done = upload(api, api.capsule(), data, "image/jpeg")  # it lies about its type
    memory = settled(api, done["memory_id"])
    assert memory["derivatives"] == dict.fromkeys(ROLES, "unsupported")
    assert memory["derivatives_reason"]
    assert set(memory["assets"]) == {"original"}
    assert api.http.get(f"/v1/memories/{memory['id']}/assets/original").content == data


async def _claim_and_vanish(server: LiveServer) -> str | None:
    db = Database.open(f"sqlite:///{server.data_dir / 'memvault.db'}")
    try:
        job = await JobQueue(db, SystemClock(), lease=2).claim("a-worker-that-dies")
        return job.memory_id if job is not None else None
    finally:
        await db.dispose()


def test_a_job_left_by_a_killed_server_completes_after_restart(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "data",
                        env={**SMALL_CHUNKS, "MEMVAULT_DERIVATIVE_WORKERS": "0"})
    server.start()
    api = server.api()
    try:
        done = upload(api, api.capsule(), jpeg(640, 480), "image/jpeg")
        memory = api.http.get(f"/v1/memories/{done['memory_id']}").json()
        assert memory["derivatives"] == dict.fromkeys(ROLES, "pending")
        server.kill(signal.SIGKILL)
        # A worker took the job and died with it: the job is left "running" under a lease
        # nobody renews.
        assert asyncio.run(_claim_and_vanish(server)) == done["memory_id"]
        server.env.update(MEMVAULT_DERIVATIVE_WORKERS="1", MEMVAULT_DERIVATIVE_LEASE="2")
        server.start()
        memory = settled(api, done["memory_id"])
        assert memory["derivatives"] == dict.fromkeys(ROLES, "ready")
        assert set(memory["assets"]) == {"original", *ROLES}
    finally:
        api.http.close()
        server.kill()


def test_a_separate_worker_process_makes_the_derivatives(tmp_path: Path) -> None:
    """Scale-out split: the server only takes uploads, ``memvault worker`` does the jobs."""
    server = LiveServer(tmp_path / "data",
                        env={**SMALL_CHUNKS, "MEMVAULT_DERIVATIVE_WORKERS": "0"})
    server.start()
    api = server.api()
    worker_log = tmp_path / "worker.log"
    worker: subprocess.Popen[bytes] | None = None
    try:
        done = upload(api, api.capsule(), jpeg(800, 600), "image/jpeg")
        with worker_log.open("wb") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "memvault", "worker", "--data", str(server.data_dir),
                 "--processes", "1"],
                env={**os.environ, "MEMVAULT_LOG_FORMAT": "json"},
                stdout=out, stderr=subprocess.STDOUT,
            )
        memory = settled(api, done["memory_id"])
        assert memory["derivatives"] == dict.fromkeys(ROLES, "ready"), worker_log.read_text()
        assert memory["thumbhash"]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, worker_log.read_text()
        events = [json.loads(line)["event"] for line in worker_log.read_text().splitlines()
                  if line.startswith("{")]
        assert events[0] == "worker.start"
        assert "jobs.done" in events
        assert events[-1] == "worker.stop"
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
        api.http.close()
        server.kill()


def test_a_worker_without_processes_is_a_usage_error(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "memvault", "worker", "--data", str(tmp_path), "--processes",
         "0"], capture_output=True, text=True, timeout=60, check=False,
    )
    assert r.returncode == 2
    assert "at least one process" in r.stderr


def big_png() -> bytes:
    """81 megapixels of one colour: a 250 KB file whose decode needs ~243 MB and a while."""
    out = io.BytesIO()
    Image.new("RGB", (9000, 9000), (30, 120, 200)).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize(("limits", "reason", "light_ends"), [
    # 50 ms is under even a small image's first decode in a fresh process (pebble replaces
    # the one it killed), so the light job may time out too: what counts is that it ends.
    ({"MEMVAULT_DERIVATIVE_TIMEOUT": "0.05"}, "took longer than 0.05 s",
     ("ready", "failed")),
    ({"MEMVAULT_DERIVATIVE_MEMORY_LIMIT": str(200 * 1024 * 1024)}, "decoder process failed",
     ("ready",)),
])
def test_an_image_over_the_job_limits_fails_alone_and_the_queue_moves_on(
    tmp_path: Path, limits: dict[str, str], reason: str, light_ends: tuple[str, ...],
) -> None:
    server = LiveServer(tmp_path / "data", env={
        **SMALL_CHUNKS, "MEMVAULT_DERIVATIVE_WORKERS": "1", "MEMVAULT_DERIVATIVE_ATTEMPTS": "1",
        **limits,
    })
    server.start()
    api = server.api()
    try:
        capsule = api.capsule()
        data = big_png()
        heavy = upload(api, capsule, data, "image/png")["memory_id"]
        memory = settled(api, heavy)
        assert memory["derivatives"] == dict.fromkeys(ROLES, "failed"), memory
        assert reason in memory["derivatives_reason"]
        assert hashlib.sha256(api.read(heavy).content).hexdigest() == (
            hashlib.sha256(data).hexdigest())  # the original is untouched
        light = upload(api, capsule, jpeg(320, 240), "image/jpeg")["memory_id"]
        ended = settled(api, light)["derivatives"]  # not pending forever: the queue moved on
        assert len(set(ended.values())) == 1
        assert set(ended.values()) <= set(light_ends), ended
    finally:
        api.http.close()
        server.kill()


def test_sizes_formats_and_the_pixel_limit_come_from_the_settings(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "data", env={
        **SMALL_CHUNKS, "MEMVAULT_DERIVATIVE_WORKERS": "1", "MEMVAULT_DISPLAY_WIDTH": "600",
        "MEMVAULT_DISPLAY_HEIGHT": "600", "MEMVAULT_DISPLAY_FORMAT": "WEBP",
        "MEMVAULT_THUMB_SIZE": "100", "MEMVAULT_DERIVATIVE_MAX_PIXELS": str(1500 * 1000),
    })
    server.start()
    api = server.api()
    try:
        capsule = api.capsule()
        fits = upload(api, capsule, jpeg(1200, 800), "image/jpeg")["memory_id"]
        memory = settled(api, fits)
        assert memory["derivatives"] == dict.fromkeys(ROLES, "ready")
        assert memory["assets"]["display"]["content_type"] == "image/webp"
        sizes = {}
        for role in ("display", "thumb"):
            body = api.http.get(f"/v1/memories/{fits}/assets/{role}").content
            with Image.open(io.BytesIO(body)) as image:
                sizes[role] = image.size
        assert sizes == {"display": (600, 400), "thumb": (100, 67)}

        too_big = upload(api, capsule, jpeg(1600, 1000), "image/jpeg")["memory_id"]
        memory = settled(api, too_big)
        assert memory["derivatives"] == dict.fromkeys(ROLES, "unsupported")
        assert memory["derivatives_reason"].startswith("too_many_pixels")
    finally:
        api.http.close()
        server.kill()
