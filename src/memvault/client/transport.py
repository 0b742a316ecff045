"""One request to the API: authenticated, retried while transient, answered or raised typed.

Success bodies are read here too (``parse``, ``Transport.fetch``): an answer that is not
memvault's (a captive portal's page, another service's JSON behind a misrouted proxy) is
``BadResponse``, never a ``JSONDecodeError`` or a pydantic ``ValidationError``.
"""

from __future__ import annotations

import re
import types
from collections.abc import AsyncIterator, Mapping
from typing import Any, TypeVar

import httpx
import pydantic

from memvault import __version__
from memvault.client.errors import BadResponse, ConnectionFailed, from_response
from memvault.client.retry import Attempts, RetryPolicy, transient_status, transient_transport
from memvault.errors import MemvaultError

M = TypeVar("M")


class Transport:
    """An ``httpx.AsyncClient`` bound to one server and token, plus the retry policy."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        retry: RetryPolicy,
        timeout: httpx.Timeout,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 32,
    ) -> None:
        self.url = check_url(url).rstrip("/")
        self.retry = retry
        self.http = httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}",
                     "User-Agent": f"memvault-python/{__version__}"},
            timeout=timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def fetch(self, shape: type[M], method: str, path: str, **options: Any) -> M:
        """``call``, and its answer's body read as ``shape`` (``parse``)."""
        return parse(await self.call(method, path, **options), shape)

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool = True,
    ) -> httpx.Response:
        """Send the request until it succeeds (a 2xx answer is returned), fails for
        good (raised as its typed error), or the retry policy gives up (the last error,
        with a note saying how long it tried)."""
        attempts = Attempts(self.retry, f"{method} {path}")
        if content is not None:
            headers = {**(headers or {}), "Content-Length": str(len(content))}
        while True:
            error: MemvaultError
            try:
                response = await self.http.request(
                    method, path, json=json, params=params, headers=headers,
                    content=_once(content) if content is not None else None)
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
                # No retry makes a URL valid (httpx counts the first as a transport error).
                raise connection_failed(f"{method} {self.url}{path}", exc) from exc
            except httpx.TransportError as exc:
                error = connection_failed(f"{method} {self.url}{path}", exc)
                if not transient_transport(exc, idempotent=idempotent):
                    raise error from exc
            else:
                if response.status_code < 300:
                    if response.content and not _is_json(response):
                        # memvault answers JSON or nothing: this is someone else's page.
                        raise BadResponse(_not_ours(response, "a JSON body"),
                                          http_status=response.status_code)
                    return response
                # Anything else is an error, a 3xx too: memvault never redirects, so one
                # comes from something in between (before, a 307 counted as done).
                error = from_response(response)
                if not transient_status(error):
                    raise error
            await attempts.wait(error)


def parse(response: httpx.Response, shape: type[M]) -> M:
    """The body of a success answer as ``shape`` (a model, or e.g. ``list[Capsule]``);
    ``BadResponse`` if it is not JSON of that shape, with the parse error as its cause."""
    try:
        return _adapter(shape).validate_json(response.content)
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        why = f"{where + ': ' if where else ''}{first['msg']}"
        raise BadResponse(_not_ours(response, f"a {_name(shape)} ({why})"),
                          http_status=response.status_code) from exc


_ADAPTERS: dict[object, pydantic.TypeAdapter[Any]] = {}


def _adapter(shape: type[M]) -> pydantic.TypeAdapter[M]:
    """One validator per shape (building one costs more than most validations)."""
    adapter = _ADAPTERS.get(shape)
    if adapter is None:
        adapter = _ADAPTERS[shape] = pydantic.TypeAdapter(shape)
    return adapter


def _name(shape: type[Any]) -> str:
    """``Memory``, ``list[Capsule]``: the shape as its code names it."""
    if isinstance(shape, types.GenericAlias):
        return re.sub(r"\b\w+\.", "", str(shape))
    return shape.__name__


def _is_json(response: httpx.Response) -> bool:
    media = str(response.headers.get("content-type", "")).partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _not_ours(response: httpx.Response, wanted: str) -> str:
    """What came instead of ``wanted``: the request, status, media type and first bytes."""
    request = response.request
    media = response.headers.get("content-type") or "no Content-Type"
    head = response.content[:120]
    return (f"{request.method} {request.url.path} answered {response.status_code} "
            f"{response.reason_phrase} with {media} ({len(response.content)} bytes), not "
            f"{wanted}: {head!r}{'...' if len(response.content) > len(head) else ''}")


_HOST = re.compile(r"[A-Za-z0-9._~-]+|[0-9A-Fa-f:.]+")  # a name, an IPv4 or an IPv6 address


def check_url(url: str) -> str:
    """``url`` if it is ``http(s)://HOST[:PORT][/PATH]``, else ``ValueError`` saying why.

    Checked when a client is made: httpx would take ``127.0.0.1:8080`` or ``ftp://...`` and
    fail each request with a transport error, which looks like a network outage and was
    retried for minutes.
    """
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except httpx.InvalidURL as exc:
        problem = str(exc)
    else:
        if parsed.scheme not in ("http", "https"):
            problem = "it must begin with http:// or https://"
        elif not parsed.host:
            problem = "it names no host"
        elif not _HOST.fullmatch(parsed.raw_host.decode("ascii", "replace")):  # IDNA'd
            problem = f"{parsed.host!r} is not a host name or address"
        elif port is not None and not 0 < port < 65536:
            problem = f"port {port} is out of range"
        elif parsed.userinfo:
            problem = "it must not carry credentials (the token is the second argument)"
        elif parsed.query or parsed.fragment:
            problem = "it must not have a query or a fragment"
        else:
            return url
    raise ValueError(f"{url!r} is not a memvault server URL: {problem}; "
                     "give http://HOST[:PORT][/PATH] or https://HOST[:PORT][/PATH]")


def connection_failed(
        what: str, exc: httpx.TransportError | httpx.InvalidURL) -> ConnectionFailed:
    """The typed error for a broken or refused connection, chained to httpx's."""
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    error = ConnectionFailed(f"{what} failed: {reason}")
    error.__cause__ = exc
    return error


async def _once(data: bytes) -> AsyncIterator[bytes]:
    """A request body that lets go of its bytes once sent.

    httpx's ``Response`` and its stream refer to each other, so a response lives until the
    cyclic garbage collector runs, and its request with it; a request made from ``bytes``
    would keep the whole chunk alive that long (measured: 24 chunks of 8 MiB held after a
    1 GiB upload at 4 in flight). A generator's frame is gone once it has yielded.
    """
    yield data
