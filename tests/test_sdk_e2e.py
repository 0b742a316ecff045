"""The SDK against a real ``memvault serve`` process over loopback HTTP.

* The predecessor's five scenarios (lane A alone, lane B alone, both lanes, the complete
  2-lane + 4-asset memory from a real JPEG, reading every asset the instant finish returns),
  20 rounds at small sizes through the blocking ``Client``, plus the 20 MiB original through
  ``AsyncClient``: zero failures allowed, and each failure names its scenario, round and cause.
* Resume after the upload task is cancelled, after the server is killed (the call fails, a
  later one resumes) and while it is down (the same call rides it out): the chunks sent after
  the interruption are counted by the server, and must be exactly the ones it lacked.
* Back-off: 503s injected by a loopback proxy, and the server's own 429 for transfer slots.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from memvault.client import (
    AsyncClient,
    Client,
    ConnectionFailed,
    Memory,
    NotFound,
    Progress,
    RetryPolicy,
)
from tests.conftest import SMALL_CHUNKS, LiveServer
from tests.faults import FaultProxy, chunk_faults, unavailable
from tests.helpers import metric

KiB = 1024
MiB = 1024 * KiB
SMALL = 256 * KiB  # the chunk size SMALL_CHUNKS gives the module's server
ROLES = ("original", "display", "thumb", "placeholder")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def photo(path: Path, width: int, height: int, seed: int) -> bytes:
    """A real JPEG with detail (noise over a gradient), so its derivatives are real work."""
    rng = random.Random(seed)
    image = Image.effect_noise((width, height), 40 + rng.random() * 30).convert("RGB")
    image.paste((rng.randrange(256), 40, 40), (0, 0, width // 3, height // 3))
    image.save(path, "JPEG", quality=90)
    return path.read_bytes()


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sdk-state")


@pytest.fixture(scope="module")
def client(server: LiveServer, state_dir: Path) -> Iterator[Client]:
    with Client(server.url, server.token, state_dir=state_dir) as c:
        yield c


# -- the five scenarios ------------------------------------------------------------------------


def _read_back(mv: Client, memory: Memory, tmp: Path, expected: dict[str, bytes]) -> None:
    """Scenario 5: every asset, read the instant the upload returned, is the bytes sent."""
    for role, data in expected.items():
        asset = memory.assets[role]
        assert asset.sha256 == sha(data), role
        sink = io.BytesIO()
        mv.download(memory.id, role, sink)
        assert sink.getvalue() == data, role


def scenario_lane_a(mv: Client, cap: str, tmp: Path, size: int, rng: random.Random) -> None:
    """(1) Lane A: the original alone, sequentially (one chunk in flight)."""
    data = rng.randbytes(size)
    (tmp / "original.bin").write_bytes(data)
    done = mv.upload_file(tmp / "original.bin", cap, parallel=1)
    assert done.chunks_sent == -(-size // SMALL)
    _read_back(mv, done.memory, tmp, {"original": data})


def scenario_lane_b(mv: Client, cap: str, tmp: Path, rng: random.Random) -> None:
    """(2) Lane B: display, thumb and placeholder into a memory, concurrently."""
    memory = mv.create_memory(cap, title="lane B")
    given = {"display": rng.randbytes(200 * KiB), "thumb": rng.randbytes(50 * KiB),
             "placeholder": rng.randbytes(1 * KiB)}

    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # one Client, used by 3 threads
        for future in [pool.submit(mv.upload_file, io.BytesIO(data), cap, memory=memory.id,
                                   role=role, filename=f"x.{role}", content_type="image/webp")
                       for role, data in given.items()]:
            future.result()
    _read_back(mv, mv.get_memory(memory.id), tmp, given)


def scenario_both_lanes(mv: Client, cap: str, tmp: Path, size: int,
                        rng: random.Random) -> None:
    """(3) Both lanes in parallel: the original streaming while given derivatives upload."""
    original = rng.randbytes(size)
    (tmp / "both.jpg").write_bytes(original)
    given = {"display": rng.randbytes(200 * KiB), "thumb": rng.randbytes(50 * KiB),
             "placeholder": rng.randbytes(KiB)}
    memory = mv.upload_memory(tmp / "both.jpg", capsule=cap, derivatives=given)
    assert sorted(memory.assets) == sorted(ROLES)
    _read_back(mv, memory, tmp, {"original": original, **given})


def scenario_four_assets(mv: Client, cap: str, tmp: Path, seed: int) -> None:
    """(4) The complete memory: a real JPEG, derivatives made by the SDK's worker."""
    original = photo(tmp / "IMG.jpg", 1600, 1200, seed)
    memory = mv.upload_memory(tmp / "IMG.jpg", capsule=cap, derivatives="auto")
    assert sorted(memory.assets) == sorted(ROLES)
    assert memory.derivatives == dict.fromkeys(ROLES[1:], "ready")
    assert memory.thumbhash  # made by the SDK's worker, stored with PATCH
    assert memory.assets["display"].content_type == "image/jpeg"
    assert memory.assets["thumb"].content_type == "image/webp"
    expected = {"original": original}
    for role in ROLES[1:]:
        sink = io.BytesIO()
        mv.download(memory, role, sink)
        expected[role] = sink.getvalue()
    with Image.open(io.BytesIO(expected["display"])) as display:
        assert max(display.size) <= 1920
        assert display.size[0] / display.size[1] == pytest.approx(4 / 3, rel=0.01)
    _read_back(mv, memory, tmp, expected)


@pytest.mark.parametrize("round_", range(20))
def test_five_scenarios(client: Client, tmp_path: Path, round_: int) -> None:
    rng = random.Random(round_)
    cap = client.capsule(f"round-{round_}", create=True).id
    failures = []
    for name, run in [
        ("1 lane A", lambda: scenario_lane_a(client, cap, tmp_path, 2 * MiB + 3, rng)),
        ("2 lane B", lambda: scenario_lane_b(client, cap, tmp_path, rng)),
        ("3 both lanes", lambda: scenario_both_lanes(client, cap, tmp_path, 2 * MiB, rng)),
        ("4 four assets", lambda: scenario_four_assets(client, cap, tmp_path, round_)),
    ]:
        try:
            run()  # each scenario ends with scenario 5: reading every asset back at once
        except Exception as exc:  # noqa: BLE001 - collected, then reported with its cause
            failures.append(f"scenario {name}, round {round_}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)
    assert client.list_sessions() == []


async def test_twenty_mib_original_and_its_memory(server: LiveServer, tmp_path: Path,
                                                  state_dir: Path) -> None:
    """Scenarios 1, 3 and 5 at the predecessor's size: a 20 MiB original."""
    rng = random.Random(20)
    async with AsyncClient(server.url, server.token, state_dir=state_dir) as mv:
        cap = await mv.capsule("twenty", create=True)
        data = rng.randbytes(20 * MiB)
        (tmp_path / "big.jpg").write_bytes(data)
        done = await mv.upload_file(tmp_path / "big.jpg", cap, parallel=1)
        assert done.asset.sha256 == sha(data)
        assert done.chunks_sent == 80
        given = {"display": rng.randbytes(200 * KiB), "thumb": rng.randbytes(50 * KiB),
                 "placeholder": rng.randbytes(KiB)}
        (tmp_path / "big.jpg").write_bytes(data[::-1])
        memory = await mv.upload_memory(tmp_path / "big.jpg", capsule=cap, derivatives=given)
        for role, expected in {"original": data[::-1], **given}.items():
            sink = io.BytesIO()
            await mv.download(memory, role, sink)
            assert sink.getvalue() == expected, role


# -- resume ------------------------------------------------------------------------------------


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[LiveServer]:
    """A server of the test's own (it gets killed), with small chunks, and claims that lapse
    in 1 s (a chunk in flight when the server is killed is taken over that much sooner)."""
    s = LiveServer(tmp_path / "data", env={**SMALL_CHUNKS, "MEMVAULT_CLAIM_LEASE": "1"})
    s.start()
    try:
        yield s
    finally:
        s.kill(signal.SIGTERM)


def puts(server: LiveServer) -> int:
    """Chunk PUTs the server process has taken in (duplicates and failures included)."""
    return int(metric(server, "memvault_chunk_seconds_count"))


def quiet(server: LiveServer) -> None:
    """Wait until no chunk transfer is in the server (bounded): what it holds is final."""
    deadline = time.monotonic() + 30
    while metric(server, "memvault_transfer_slots_in_use") > 0:
        assert time.monotonic() < deadline, "chunk transfers still running after 30 s"
        time.sleep(0.05)


def stop_at(chunks: int) -> tuple[asyncio.Event, Any]:
    reached = asyncio.Event()

    def progress(p: Progress) -> None:
        if p.phase == "transfer" and p.chunks_done >= chunks:
            reached.set()

    return reached, progress


async def test_cancelled_upload_resumes_with_only_the_missing_chunks(
        small_server: LiveServer, tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    count = 40
    stop = rng.randrange(1, count - 8)
    data = rng.randbytes(count * SMALL - 1000)
    path = tmp_path / "movie.mov"
    path.write_bytes(data)
    async with AsyncClient(small_server.url, small_server.token,
                           state_dir=tmp_path / "state") as mv:
        cap = (await mv.capsule("resume", create=True)).id
        reached, progress = stop_at(stop)
        task = asyncio.create_task(mv.upload_file(path, cap, parallel=4, on_progress=progress))
        await reached.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(quiet, small_server)
        [session] = await mv.list_sessions()
        held = len(session.received)
        assert held >= stop, f"seed {seed}"
        before = puts(small_server)
        done = await mv.upload_file(path, cap, parallel=4)
    assert puts(small_server) - before == count - held, f"seed {seed}, stopped at {stop}"
    assert done.chunks_skipped == held
    assert done.asset.sha256 == sha(data)
    assert done.session_id == session.id


async def test_killed_server_then_a_later_call_sends_only_the_missing_chunks(
        small_server: LiveServer, tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    count = 40
    stop = rng.randrange(1, count - 8)
    data = rng.randbytes(count * SMALL)
    path = tmp_path / "movie.mov"
    path.write_bytes(data)
    quick = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.1)
    async with AsyncClient(small_server.url, small_server.token, retry=quick,
                           state_dir=tmp_path / "state") as mv:
        cap = (await mv.capsule("kill", create=True)).id
        reached, progress = stop_at(stop)
        task = asyncio.create_task(mv.upload_file(path, cap, parallel=4, on_progress=progress))
        await reached.wait()
        await asyncio.to_thread(small_server.kill)  # SIGKILL, mid-transfer
        with pytest.raises(ConnectionFailed) as info:
            await task
        assert "gave up after" in "".join(info.value.__notes__)
        await asyncio.to_thread(small_server.start)
        [session] = await mv.list_sessions()
    held = set(session.received)
    assert len(held) >= stop - 4, f"seed {seed}"  # what was acknowledged survived the kill
    # The next call goes through a (fault-free) proxy that records every request it passes.
    with FaultProxy(small_server.url) as proxy:
        async with AsyncClient(proxy.url, small_server.token,
                               state_dir=tmp_path / "state") as mv:
            done = await mv.upload_file(path, cap, parallel=4)
    sent = {int(p.rsplit("/", 1)[1]) for m, p in proxy.log.passed if "/chunks/" in p}
    assert sent == set(range(count)) - held, f"seed {seed}, stopped at {stop}"
    # A chunk in flight at the kill may be answered 503 once ("the transfer that held this
    # chunk stopped"), after its claim lapses, and be sent again: the same chunk, not more.
    assert metric(small_server, "memvault_bytes_received_total") == (count - len(held)) * SMALL
    assert done.asset.sha256 == sha(data)
    assert done.chunks_skipped == len(held)


async def test_the_same_call_rides_out_a_server_restart(
        small_server: LiveServer, tmp_path: Path) -> None:
    rng = random.Random(7)
    data = rng.randbytes(30 * SMALL + 1)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    patient = RetryPolicy(attempts=100, max_wait=60, base_delay=0.05, max_delay=0.5)
    async with AsyncClient(small_server.url, small_server.token, retry=patient,
                           state_dir=tmp_path / "state") as mv:
        cap = (await mv.capsule("restart", create=True)).id
        reached, progress = stop_at(10)
        task = asyncio.create_task(mv.upload_file(path, cap, parallel=4, on_progress=progress))
        await reached.wait()
        await asyncio.to_thread(small_server.kill)
        await asyncio.to_thread(small_server.start)
        done = await task
    assert done.asset.sha256 == sha(data)
    assert done.chunks_sent + done.chunks_skipped >= 31


# -- back-off ----------------------------------------------------------------------------------


def test_injected_503s_with_retry_after_are_waited_out(server: LiveServer, tmp_path: Path) -> None:
    data = os.urandom(6 * SMALL)
    (tmp_path / "f.bin").write_bytes(data)
    with FaultProxy(server.url, chunk_faults(unavailable(1), every=3, times=1)) as proxy, \
            Client(proxy.url, server.token, state_dir=tmp_path / "state") as mv:
        cap = mv.capsule("proxied", create=True)
        started = time.monotonic()
        done = mv.upload_file(tmp_path / "f.bin", cap, parallel=3)
        elapsed = time.monotonic() - started
        with pytest.raises(NotFound):
            mv.get_memory("mem_unknown")
    assert done.asset.sha256 == sha(data)
    assert [(m, s) for m, _, s in proxy.log.injected] == [("PUT", 503), ("PUT", 503)]
    assert proxy.log.count("GET", "/v1/memories/mem_unknown") == 1  # not retried
    assert elapsed >= 1.0  # Retry-After: 1 was honoured (a lower bound, not a timing race)


def test_the_servers_own_429_for_transfer_slots_is_backed_off(tmp_path: Path) -> None:
    """One transfer slot per caller, held by a slow chunk of another upload: every chunk the
    SDK sends is refused (429, Retry-After: 1) until that slot frees, then all go through."""
    s = LiveServer(tmp_path / "data",
                   env={**SMALL_CHUNKS, "MEMVAULT_TRANSFER_SLOTS_PER_PRINCIPAL": "1"})
    s.start()
    try:
        api = s.api()
        holder = api.session(api.capsule(), SMALL)
        release = threading.Event()

        def slow_body() -> Iterator[bytes]:
            yield b"x" * 1024
            release.wait(30)
            yield b"x" * (SMALL - 1024)

        def hold_the_slot() -> int:
            r = api.http.put(f"/v1/uploads/{holder['id']}/chunks/0", content=slow_body(),
                             headers={"Content-Length": str(SMALL)})
            return r.status_code

        data = os.urandom(3 * SMALL)
        (tmp_path / "f.bin").write_bytes(data)
        with concurrent.futures.ThreadPoolExecutor(2) as pool, \
                Client(s.url, s.token, state_dir=tmp_path / "state") as mv:
            held = pool.submit(hold_the_slot)
            deadline = time.monotonic() + 30
            while metric(s, "memvault_transfer_slots_in_use") < 1:
                assert time.monotonic() < deadline, "the slow chunk never took its slot"
                time.sleep(0.02)
            cap = mv.capsule("slots", create=True)
            upload = pool.submit(mv.upload_file, tmp_path / "f.bin", cap, parallel=2)
            while metric(s, "memvault_admission_rejections_total",
                         limit="transfer_slots_per_principal") < 1:
                assert time.monotonic() < deadline, "no chunk was refused"
                time.sleep(0.02)
            release.set()
            done = upload.result(timeout=120)
            assert held.result() == 200
        assert done.asset.sha256 == sha(data)
        assert puts(s) == 1 + 3  # the slow chunk, then each of ours once: refusals took none
        api.http.close()
    finally:
        s.kill(signal.SIGTERM)


# -- the blocking client, interrupted ----------------------------------------------------------

_INTERRUPTED_SCRIPT = """
import sys
from memvault.client import Client

url, token, path, cap, state = sys.argv[1:]

def progress(p):
    if p.phase == "transfer" and p.chunks_done == 6:
        print("six chunks in", flush=True)

with Client(url, token, state_dir=state) as mv:
    mv.upload_file(path, cap, parallel=1, on_progress=progress)
print("finished", flush=True)
"""


def test_ctrl_c_in_the_blocking_client_keeps_the_upload_resumable(
        small_server: LiveServer, tmp_path: Path) -> None:
    """A script using ``Client`` gets Ctrl-C while the upload waits out a 503 (its chunks
    after the sixth are refused with Retry-After: 30 by a proxy): the call stops at once with
    KeyboardInterrupt, and the next call, straight to the server, sends only the rest."""
    data = os.urandom(20 * SMALL)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    api = small_server.api()
    cap = api.capsule("interrupted")

    def refuse_late_chunks(method: str, p: str, seen: int) -> Any:
        if method == "PUT" and "/chunks/" in p and int(p.rsplit("/", 1)[1]) >= 6:
            return unavailable(30)
        return None

    try:
        with FaultProxy(small_server.url, refuse_late_chunks) as proxy:
            proc = subprocess.Popen(
                [sys.executable, "-c", _INTERRUPTED_SCRIPT, proxy.url, small_server.token,
                 str(path), cap, str(tmp_path / "state")],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "six chunks in"
            while not proxy.log.injected:  # the seventh chunk met its 503: the client waits
                assert proc.poll() is None
                time.sleep(0.02)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert "KeyboardInterrupt" in err
        assert "finished" not in out
        assert list((tmp_path / "state" / "uploads").glob("*.json"))  # the resume record
        with Client(small_server.url, small_server.token, state_dir=tmp_path / "state") as mv:
            done = mv.upload_file(path, cap)
        assert done.chunks_skipped == 6
        assert done.chunks_sent == 14
        assert done.asset.sha256 == sha(data)
    finally:
        api.http.close()


def test_closing_the_client_ends_a_call_in_flight_in_another_thread(
        small_server: LiveServer, tmp_path: Path) -> None:
    """``close()`` while another thread's upload waits (a proxy answers its later chunks
    503 with Retry-After: 30): that call raises at once, instead of waiting for ever on a
    stopped loop; later calls say the client is closed."""
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(20 * SMALL))
    api = small_server.api()
    cap = api.capsule("closed-meanwhile")

    def refuse_late_chunks(method: str, p: str, seen: int) -> Any:
        if method == "PUT" and "/chunks/" in p and int(p.rsplit("/", 1)[1]) >= 2:
            return unavailable(30)
        return None

    raised: list[BaseException] = []

    def upload(mv: Client) -> None:
        try:
            mv.upload_file(path, cap, parallel=1)
        except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
            raised.append(exc)

    try:
        with FaultProxy(small_server.url, refuse_late_chunks) as proxy:
            mv = Client(proxy.url, small_server.token, state_dir=tmp_path / "state")
            worker = threading.Thread(target=upload, args=(mv,))
            worker.start()
            while not proxy.log.injected:
                assert worker.is_alive()
                time.sleep(0.02)
            mv.close()
            worker.join(timeout=30)
            assert not worker.is_alive(), "the other thread's call never returned"
        assert [type(e) for e in raised] == [RuntimeError]
        assert "closed while this call ran" in str(raised[0])
        with pytest.raises(RuntimeError, match="closed"):
            mv.list_capsules()
        # The interrupted upload kept its resume record, as a cancelled call does.
        with Client(small_server.url, small_server.token, state_dir=tmp_path / "state") as mv:
            assert mv.upload_file(path, cap).chunks_skipped == 2
    finally:
        api.http.close()


def test_a_client_called_from_its_own_progress_callback_raises_instead_of_hanging(
        small_server: LiveServer, tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(4 * SMALL))
    raised: list[BaseException] = []

    with Client(small_server.url, small_server.token, state_dir=tmp_path / "state") as mv:
        cap = mv.create_capsule("reentry").id

        def progress(p: Progress) -> None:
            if p.phase == "transfer":
                mv.list_capsules()

        def upload() -> None:
            try:
                mv.upload_file(path, cap, on_progress=progress)
            except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
                raised.append(exc)

        worker = threading.Thread(target=upload)
        worker.start()
        worker.join(timeout=60)
        assert not worker.is_alive(), "the call deadlocked"
        assert [type(e) for e in raised] == [RuntimeError]
        assert "own thread" in str(raised[0])
        assert [c.name for c in mv.list_capsules()] == ["reentry"]  # still usable


def test_a_client_never_closed_warns_and_ends_its_thread(small_server: LiveServer,
                                                         tmp_path: Path) -> None:
    mv = Client(small_server.url, small_server.token, state_dir=tmp_path / "state")
    mv.list_capsules()
    thread = mv._thread.thread
    with pytest.warns(ResourceWarning, match="never closed"):
        del mv  # nothing else refers to it: collected here
    thread.join(timeout=10)
    assert not thread.is_alive()
