"""The engine's end-to-end scenarios against a scale-out deployment.

Three ``memvault serve`` processes, each with a data folder of its own (nothing shared on
disk), on one PostgreSQL database and one S3 bucket (moto, on loopback). Every request goes to
a process picked at random, as behind a load balancer without sticky sessions. Chunks are
5 MiB here, S3's smallest part size.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.conftest import LiveServer, fresh_postgres
from tests.helpers import Api, problem
from tests.s3server import S3Server
from tests.test_e2e_durability import _slow_body

MiB = 1024 * 1024
PART = 5 * MiB


class RandomBackend(httpx.BaseTransport):
    """Sends each request to one of the servers, chosen at random (seeded per test)."""

    def __init__(self, ports: list[int], seed: int) -> None:
        self.ports = ports
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            port = self.random.choice(self.ports)
        request.url = request.url.copy_with(host="127.0.0.1", port=port)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


@dataclass
class Deployment:
    servers: list[LiveServer]
    token: str

    def api(self, seed: int = 0) -> Api:
        ports = [s.port for s in self.servers if s.proc is not None and s.proc.poll() is None]
        return Api(httpx.Client(transport=RandomBackend(ports, seed), base_url="http://lb",
                                timeout=120, headers={"Authorization": f"Bearer {self.token}"}))


@pytest.fixture(scope="module")
def deployment(s3_server: S3Server,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with fresh_postgres() as database_url:
        env = {
            **s3_server.env(s3_server.new_bucket(), "deploy"),
            "MEMVAULT_DATABASE_URL": database_url, "MEMVAULT_AUTO_MIGRATE": "true",
            "MEMVAULT_CHUNK_SIZE": str(PART), "MEMVAULT_CLAIM_LEASE": "2",
            "MEMVAULT_DERIVATIVE_WORKERS": "0", "MEMVAULT_STORAGE_RESERVE": "0",
            # No reaper passes: moto dates every multipart upload in 2010, so the staging
            # sweep would take uploads whose sessions are still being begun.
            "MEMVAULT_REAPER_INTERVAL": "3600",
        }
        root = tmp_path_factory.mktemp("deploy")
        servers = [LiveServer(root / f"node{i}", env=env) for i in range(3)]
        try:
            for server in servers:  # one after another: the first migrates and mints admin
                server.start()
            yield Deployment(servers, servers[0].token)
        finally:
            for server in servers:
                server.kill()


@pytest.fixture
def api(deployment: Deployment, request: pytest.FixtureRequest) -> Iterator[Api]:
    client = deployment.api(seed=hash(request.node.name) & 0xFFFF)
    yield client
    client.http.close()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_each_upload_is_visible_on_every_process_the_instant_finish_returns(api: Api) -> None:
    capsule = api.capsule()
    rng = random.Random(1)
    for _ in range(20):
        data = os.urandom(rng.choice([1, 1000, 300_000, PART + 17]))
        done = api.upload(capsule, data)
        memory = done["memory_id"]
        for _ in range(3):  # three reads, likely on three different processes
            assert api.http.get(f"/v1/memories/{memory}").json()["assets"]["original"][
                "sha256"] == digest(data)
            assert api.read(memory).content == data
        listed = api.http.get(f"/v1/capsules/{capsule}/memories", params={"limit": 1}).json()
        assert listed["items"][0]["id"] == memory


def test_sparse_interleaving_of_two_sessions(api: Api) -> None:
    capsule = api.capsule()
    a_data, b_data = os.urandom(2 * PART + 11), os.urandom(2 * PART + 22)
    a, b = api.session(capsule, len(a_data)), api.session(capsule, len(b_data))
    for session, data, index in [(a, a_data, 0), (b, b_data, 0), (a, a_data, 2),
                                 (b, b_data, 2), (a, a_data, 1), (b, b_data, 1)]:
        r = api.put(session, index, data)
        assert r.status_code == 200, r.text
    for session, data in [(a, a_data), (b, b_data)]:
        r = api.finish(session, data)
        assert r.status_code == 200, r.text
        assert api.read(r.json()["memory_id"]).content == data


def test_duplicate_chunk_same_bytes_ok_different_bytes_conflict(api: Api) -> None:
    data = os.urandom(PART + 5)
    s = api.session(api.capsule(), len(data))
    for _ in range(3):
        assert api.put(s, 0, data).status_code == 200
    other = bytearray(data)
    other[10] ^= 0xFF
    problem(api.put(s, 0, bytes(other)), 409, "conflict")
    assert api.put(s, 1, data).status_code == 200
    assert api.finish(s, data).status_code == 200


def test_partial_last_chunk_and_zero_byte_file(api: Api) -> None:
    capsule = api.capsule()
    for data in (b"", os.urandom(2 * PART + 1)):
        done = api.upload(capsule, data)
        assert done["asset"]["size"] == len(data)
        assert api.read(done["memory_id"]).content == data


def test_concurrent_out_of_order_chunks_one_session_and_four_sessions(
    deployment: Deployment,
) -> None:
    capsule_api = deployment.api(seed=5)
    try:
        capsule = capsule_api.capsule()
        files = [os.urandom(5 * PART + 3)] + [os.urandom(2 * PART + i) for i in range(4)]
        sessions = [capsule_api.session(capsule, len(data)) for data in files]
        work = [(s, data, i) for s, data in zip(sessions, files, strict=True)
                for i in range(s["chunk_count"])]
        random.Random(3).shuffle(work)

        def put(item: tuple[dict[str, object], bytes, int]) -> int:
            session, data, index = item
            client = deployment.api(seed=index * 7919 + len(data))
            try:
                return client.put(session, index, data).status_code
            finally:
                client.http.close()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert set(pool.map(put, work)) == {200}
        for session, data in zip(sessions, files, strict=True):
            r = capsule_api.finish(session, data)
            assert r.status_code == 200, r.text
            assert r.json()["asset"]["sha256"] == digest(data)
    finally:
        capsule_api.http.close()


def test_a_process_killed_mid_chunk_leaves_the_upload_resumable_on_the_others(
    deployment: Deployment,
) -> None:
    victim, *others = deployment.servers
    token = deployment.token
    direct = victim.api(token)
    data = os.urandom(3 * PART + 99)
    s = direct.session(direct.capsule(), len(data))
    assert direct.put(s, 0, data).status_code == 200
    started = threading.Event()

    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the process dies under it
            direct.http.put(f"/v1/uploads/{s['id']}/chunks/1",
                            content=_slow_body(data[PART:2 * PART], PART // 2, started),
                            headers={"Content-Length": str(PART)})

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    assert started.wait(30)
    time.sleep(0.3)
    victim.kill()  # SIGKILL
    direct.http.close()

    survivors = Deployment(others, token).api(seed=11)
    try:
        status = survivors.http.get(f"/v1/uploads/{s['id']}").json()
        assert (status["state"], status["received"]) == ("pending", [0])
        for index in (1, 2, 3):
            r = survivors.put(s, index, data)
            while r.status_code == 503:  # chunk 1's claim lapses after the claim lease
                time.sleep(float(r.headers["retry-after"]))
                r = survivors.put(s, index, data)
            assert r.status_code == 200, r.text
        done = survivors.finish(s, data)
        assert done.status_code == 200, done.text
        assert done.json()["asset"]["sha256"] == digest(data)
        assert survivors.read(done.json()["memory_id"]).content == data
    finally:
        survivors.http.close()
        victim.start()  # back for any later test of the module
