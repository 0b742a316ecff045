"""The SDK's contract with its users: what a type checker sees of ``memvault``, which URLs a
client takes, and what every answer that is not a plain success is raised as.

Type checks run the real ``mypy --strict`` on a small user program (from the repository, so
its cache makes a run take a fraction of a second); answers are the real app's
(``httpx.ASGITransport``), with a proxy's or a stranger's answers injected in front of it.
"""

from __future__ import annotations

import inspect
import io
import json
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest

import memvault
from memvault.client import (
    AsyncClient,
    BadResponse,
    Client,
    ConnectionFailed,
    Internal,
    MemvaultError,
    RetryPolicy,
    UnknownError,
)
from tests.asgi import FAST_RETRIES, InApp, in_app

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def app() -> AsyncIterator[InApp]:
    async with in_app() as a:
        yield a


class Stranger(httpx.AsyncBaseTransport):
    """Between the SDK and the real app: ``answer(request)`` gives what something else (a
    proxy, a captive portal, a newer server) answers instead, or None to pass it through."""

    def __init__(self, app: InApp,
                 answer: Callable[[httpx.Request], httpx.Response | None]) -> None:
        self.app = app
        self.answer = answer
        self.requests: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        response = self.answer(request)
        if response is not None:
            await request.aread()
            return response
        return await self.app.transport.handle_async_request(request)

    def client(self, **options: Any) -> AsyncClient:
        options.setdefault("retry", FAST_RETRIES)
        return AsyncClient(self.app.url, self.app.token, transport=self,
                           state_dir=self.app.root / "client-state", **options)


def mypy_errors(tmp_path: Path, program: str) -> dict[int, str]:
    """``mypy --strict`` on ``program``: its error messages by line number."""
    path = tmp_path / "user_program.py"
    path.write_text(textwrap.dedent(program))
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
         "--hide-error-context", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode in (0, 1), run.stderr + run.stdout
    errors: dict[int, str] = {}
    for line in run.stdout.splitlines():
        # By name only: for a program it has seen, mypy's cache replays the errors under
        # the path it had then (another test's tmp_path).
        found = re.match(r".*user_program\.py:(\d+): error: (.*)", line)
        if found:
            errors[int(found[1])] = errors.get(int(found[1]), "") + found[2]
    return errors


# -- what a type checker sees --------------------------------------------------------------------


def test_a_misspelled_name_from_memvault_is_a_type_error(tmp_path: Path) -> None:
    """The lazy ``__getattr__`` is hidden from type checkers: it made every name ``Any``."""
    errors = mypy_errors(tmp_path, """\
        import memvault

        def main(url: str, token: str) -> None:
            try:
                with memvault.Clinet(url, token) as mv:
                    mv.list_capsules()
            except memvault.Error:
                pass
            try:
                with memvault.Client(url, token) as mv:
                    mv.list_capsules()
            except memvault.MemvaultError as exc:
                print(exc.code, exc.status)
        """)
    assert sorted(errors) == [5, 7], errors
    assert '"Clinet"' in errors[5]
    assert '"Error"' in errors[7]


def test_the_package_lists_its_lazy_names() -> None:
    names = dir(memvault)
    assert {"Client", "AsyncClient", "MemvaultError", "__version__"} <= set(names)
    assert set(memvault.__all__) <= set(names)
    assert memvault.Client is memvault.client.Client


def test_importing_memvault_does_not_import_the_client() -> None:
    """The server imports ``memvault``; the client stack (httpx, derivatives) comes only with
    the first use of a client name, and ``dir()`` is not a use."""
    code = ("import sys, memvault; dir(memvault); "
            "assert 'memvault.client' not in sys.modules, 'imported by dir'; "
            "memvault.Client; assert 'memvault.client' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_typed_wrapper_can_name_every_type_it_needs(tmp_path: Path) -> None:
    errors = mypy_errors(tmp_path, """\
        from memvault import (
            UNSET, AsyncClient, CapsuleRef, Derivatives, Memory, MemoryRef, MemvaultError,
            PathOrStream, Progress, ProgressCallback, Unset, UploadMemoryError, WorkerDied,
        )

        def report(progress: Progress) -> None:
            print(progress.bytes_done)

        async def store(mv: AsyncClient, photo: PathOrStream, capsule: CapsuleRef, *,
                        derivatives: Derivatives = "auto",
                        on_progress: ProgressCallback = report) -> Memory | None:
            memory: Memory | None = None
            try:
                memory = await mv.upload_memory(photo, capsule=capsule,
                                                derivatives=derivatives,
                                                on_progress=on_progress)
            except* WorkerDied:
                pass
            return memory

        async def retitle(mv: AsyncClient, memory: MemoryRef,
                          title: str | Unset | None = UNSET) -> Memory:
            return await mv.update_memory(memory, title=title)

        def lanes(error: UploadMemoryError) -> list[str]:
            return [e.code for e in error.exceptions if isinstance(e, MemvaultError)]
        """)
    assert errors == {}


def test_the_exports_are_the_client_modules_own_names() -> None:
    from memvault.client import async_client, lanes, upload, workers

    assert memvault.UNSET is async_client.UNSET
    assert memvault.Unset is async_client.Unset
    assert memvault.CapsuleRef == async_client.CapsuleRef
    assert memvault.Derivatives == lanes.Derivatives
    assert memvault.ProgressCallback == upload.ProgressCallback
    assert memvault.WorkerDied is workers.WorkerDied
    # A failure of this machine's worker process, like the OSError and TimeoutError next to
    # it: not a server's or network's failure (see memvault.client.errors).
    assert not issubclass(memvault.WorkerDied, memvault.MemvaultError)


def test_client_options_are_typed(tmp_path: Path) -> None:
    """``Client(url, token, **options: Any)`` took ``retyr=3`` without a word from mypy."""
    errors = mypy_errors(tmp_path, """\
        from memvault import Client, RetryPolicy

        def main(url: str, token: str) -> None:
            Client(url, token, retyr=3)
            Client(url, token, max_connection=8)
            Client(url, token, timeout="30")
            Client(url, token, retry=RetryPolicy(attempts=3), timeout=30, max_connections=8,
                   state_dir="/tmp/s", derivative_workers=2, derivative_timeout=60.0)
        """)
    assert sorted(errors) == [4, 5, 6], errors
    assert '"retyr"' in errors[4]
    assert '"max_connection"' in errors[5]
    assert '"timeout"' in errors[6]


def test_client_takes_exactly_the_async_clients_options() -> None:
    sync = list(inspect.signature(Client.__init__).parameters.values())
    aio = list(inspect.signature(AsyncClient.__init__).parameters.values())
    assert sync == aio


# -- the server's URL ----------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "127.0.0.1:8080", "localhost:8080", "ftp://example.org/memvault", "http://",
    "http:///v1", "http://:8080", "http://host:port", "http://host:99999", "",
    "http://user:secret@host", "http://host/?token=x", "http://host name",
])
def test_a_malformed_url_is_refused_when_the_client_is_made(url: str) -> None:
    threads = threading.active_count()
    with pytest.raises(ValueError, match="is not a memvault server URL"):
        AsyncClient(url, "token")
    with pytest.raises(ValueError, match="is not a memvault server URL"):
        Client(url, "token")
    assert threading.active_count() == threads  # no loop thread left behind


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080", "https://memvault.example.org", "https://[::1]:8443/memvault/",
    "HTTP://Example.org", "http://bücher.example",
])
async def test_a_well_formed_url_is_taken(url: str, tmp_path: Path) -> None:
    async with AsyncClient(url, "token", state_dir=tmp_path) as mv:
        assert mv.url == url.rstrip("/")


@pytest.mark.parametrize("exc", [
    httpx.UnsupportedProtocol("Request URL has an unsupported protocol 'ftp://'."),
    httpx.InvalidURL("Invalid port: 'x'"),
])
async def test_an_unusable_request_url_is_not_retried(app: InApp, exc: Exception) -> None:
    """Whatever makes httpx refuse a URL (a redirect's, a server-given one), no retry mends it:
    raised at once, not after a minute of backoff as if the network were down."""
    def answer(request: httpx.Request) -> httpx.Response | None:
        raise exc

    stranger = Stranger(app, answer)
    started = time.monotonic()
    async with stranger.client(retry=RetryPolicy(attempts=5, base_delay=1, max_delay=1)) as mv:
        with pytest.raises(ConnectionFailed) as info:
            await mv.list_capsules()
    assert time.monotonic() - started < 1
    assert stranger.requests == ["GET /v1/capsules"]
    assert info.value.__cause__ is exc


# -- success answers that are not memvault's -----------------------------------------------------

PORTAL = b"<!doctype html><html><title>Sign in to Hotel WiFi</title>" + b" " * 300 + b"</html>"

CALLS: dict[str, Callable[[AsyncClient], Awaitable[Any]]] = {
    "list_capsules": lambda mv: mv.list_capsules(),
    "create_capsule": lambda mv: mv.create_capsule("c"),
    "capsule": lambda mv: mv.capsule("c", create=True),
    "create_memory": lambda mv: mv.create_memory("cap1", title="t"),
    "get_memory": lambda mv: mv.get_memory("mem1"),
    "update_memory": lambda mv: mv.update_memory("mem1", title="t"),
    "list_memories": lambda mv: mv.list_memories("cap1"),
    "find_memories": lambda mv: mv.find_memories("cap1", "00" * 32),
    "list_sessions": lambda mv: mv.list_sessions(),
    "admin_sessions": lambda mv: mv.admin_sessions(),
    "get_session": lambda mv: mv.get_session("ses1"),
    "download": lambda mv: mv.download("mem1", dest=io.BytesIO()),
    "upload_file": lambda mv: mv.upload_file(io.BytesIO(b"abc"), "cap1", filename="a.bin"),
}
def answering(status: int, content_type: str | None, body: bytes
              ) -> Callable[[httpx.Request], httpx.Response]:
    headers = {"Content-Type": content_type} if content_type else {}
    return lambda request: httpx.Response(status, headers=headers, content=body)


ANSWERS = {
    "portal-html": ("text/html; charset=utf-8", PORTAL, "text/html"),
    "other-json": ("application/json", json.dumps({"status": "ok", "data": [1]}).encode(),
                   "ok"),
    "cut-json": ("application/json", b'{"id": "cap1", "na', "Invalid JSON"),
    "empty": (None, b"", "no Content-Type"),
}


@pytest.mark.parametrize(("call", "content_type", "body", "said"), [
    pytest.param(call, *answer, id=f"{kind}-{call}")
    for kind, answer in ANSWERS.items() for call in CALLS])
async def test_a_success_answer_of_another_shape_is_a_bad_response(
        app: InApp, call: str, content_type: str | None, body: bytes, said: str) -> None:
    """A captive portal's page or a misrouted proxy's JSON, with a 2xx status: raised as
    ``BadResponse`` naming the request and what came back, never a ``JSONDecodeError`` or a
    pydantic ``ValidationError`` (at once: it is not transient)."""
    stranger = Stranger(app, answering(200, content_type, body))
    async with stranger.client() as mv:
        with pytest.raises(BadResponse) as info:
            await CALLS[call](mv)
    error = info.value
    assert stranger.requests[-1] in error.detail
    assert len(stranger.requests) == len(set(stranger.requests))  # nothing retried
    assert error.http_status == 200
    if call not in ("download", "upload_file") or content_type is None:
        assert said in error.detail
    if content_type is not None and "html" in content_type:
        assert "Hotel WiFi" in error.detail
        assert len(error.detail) < 400  # the page's first bytes, not all of it


async def test_the_parse_error_is_kept_as_the_cause(app: InApp) -> None:
    other = json.dumps([{"uuid": "x", "label": "family"}]).encode()
    async with Stranger(app, answering(200, "application/json", other)).client() as mv:
        with pytest.raises(BadResponse) as info:
            await mv.list_capsules()
    assert isinstance(info.value.__cause__, pydantic.ValidationError)
    assert "list[Capsule]" in info.value.detail
    assert "0.id: Field required" in info.value.detail


async def test_memvault_answers_still_read_as_models(app: InApp) -> None:
    """The same calls, passed through to the real app: every shape reads."""
    async with Stranger(app, lambda request: None).client() as mv:
        cap = await mv.capsule("family", create=True)
        assert [c.id for c in await mv.list_capsules()] == [cap.id]
        memory = await mv.create_memory(cap, title="t")
        assert (await mv.update_memory(memory, title="u")).title == "u"
        assert (await mv.get_memory(memory.id)).id == memory.id
        assert [m.id for m in (await mv.list_memories(cap)).items] == [memory.id]
        assert await mv.list_sessions() == []
        assert await mv.admin_sessions() == []


# -- error codes this SDK does not know ----------------------------------------------------------


def problem(status: int, code: str, **members: Any) -> httpx.Response:
    body = {"type": f"https://example.org/{code}", "title": code, "status": status,
            "code": code, "detail": f"the server says {code}", **members}
    return httpx.Response(status, headers={"Content-Type": "application/problem+json",
                                           "Retry-After": "0"}, json=body)


def first_time(answer: httpx.Response, method: str = "GET", path: str = "/v1/capsules"
               ) -> Callable[[httpx.Request], httpx.Response | None]:
    """``answer`` for the first ``method path`` request; the real app's for the rest."""
    seen: list[httpx.Request] = []

    def rule(request: httpx.Request) -> httpx.Response | None:
        if (request.method, request.url.path) == (method, path) and not seen:
            seen.append(request)
            return answer
        return None
    return rule


@pytest.mark.parametrize(("status", "transient"), [
    (418, False), (409, False), (400, False), (501, False), (507, False),
    (500, True), (503, True), (429, True), (408, True),
])
async def test_an_unknown_code_keeps_its_status_and_is_retried_only_if_that_is_transient(
        app: InApp, status: int, transient: bool) -> None:
    stranger = Stranger(app, first_time(problem(status, "teapot", brewing="earl grey")))
    async with stranger.client() as mv:
        if transient:
            assert await mv.list_capsules() == []
            assert stranger.requests == ["GET /v1/capsules"] * 2
            return
        with pytest.raises(UnknownError) as info:
            await mv.list_capsules()
    assert stranger.requests == ["GET /v1/capsules"]  # at once: no retry
    error = info.value
    assert isinstance(error, MemvaultError)
    assert not isinstance(error, Internal)
    assert (error.code, error.status, error.http_status) == ("teapot", status, status)
    assert error.detail == "the server says teapot"
    assert error.extra == {"brewing": "earl grey"}
    assert (type(error).code, type(error).status) == ("unknown", 0)
    assert error.to_problem()["code"] == "teapot"


async def test_an_unknown_409_is_not_taken_for_a_conflict(app: InApp) -> None:
    """``capsule(create=True)`` reads a ``Conflict`` as "made meanwhile" and looks again; a new
    code of the same status must not send it round (the nearest-class mapping did)."""
    stranger = Stranger(app, first_time(problem(409, "capsule_frozen"), "POST"))
    async with stranger.client() as mv:
        with pytest.raises(UnknownError) as info:
            await mv.capsule("family", create=True)
    assert info.value.code == "capsule_frozen"
    assert stranger.requests == ["GET /v1/capsules", "POST /v1/capsules"]


async def test_a_bad_response_status_is_the_status_it_came_with(app: InApp) -> None:
    gateway = httpx.Response(504, headers={"Content-Type": "text/html"},
                             content=b"<html>Gateway Timeout</html>")
    policy = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.001)
    async with Stranger(app, lambda request: gateway).client(retry=policy) as mv:
        with pytest.raises(BadResponse) as info:
            await mv.list_capsules()
    assert (info.value.status, info.value.http_status, info.value.code) == \
        (504, 504, "bad_response")

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    async with Stranger(app, refuse).client(retry=policy) as mv:
        with pytest.raises(ConnectionFailed) as refused:
            await mv.list_capsules()
    assert refused.value.status == 0  # no answer was read
