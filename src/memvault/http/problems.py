"""The one place errors become HTTP responses (RFC 9457 ``application/problem+json``)."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from memvault.errors import (
    Internal,
    InvalidArgument,
    MemvaultError,
    MethodNotAllowed,
    NotFound,
    Unavailable,
)

log = structlog.get_logger("memvault.http")

PROBLEM = "application/problem+json"


def problem_response(error: MemvaultError) -> JSONResponse:
    return JSONResponse(
        error.to_problem(), status_code=error.status, headers=error.headers(),
        media_type=PROBLEM,
    )


async def _memvault_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MemvaultError)
    limit = exc.extra.get("limit_name")
    log.info("request.rejected", method=request.method, path=request.url.path,
             code=exc.code, limit=limit, detail=exc.detail)
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.rejected(exc.code, limit)
    return problem_response(exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    where = ", ".join(".".join(str(p) for p in e["loc"]) + ": " + e["msg"] for e in errors)
    sent_as = request.headers.get("content-type", "")
    if sent_as and not _is_json(sent_as) and any(e["loc"] == ["body"] for e in errors):
        # FastAPI reads a body of another media type as bytes, and says only that they are
        # not an object.
        where = f"the body must be JSON, sent as Content-Type: application/json (not {sent_as!r})"
    return await _memvault_error(
        request, InvalidArgument(f"request is not valid: {where}", errors=errors)
    )


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if isinstance(exc.__cause__, MemvaultError):
        # FastAPI wraps errors raised while it reads a body (e.g. the JSON size limit).
        return await _memvault_error(request, exc.__cause__)
    # Routing errors (unknown path, wrong method) in the same problem shape as everything else.
    path = request.url.path
    # A path of any length is echoed back only in part (a 60 KB path made a 60 KB answer).
    what = f"{request.method} {path if len(path) <= 200 else path[:200] + '…'}"
    error: MemvaultError
    if exc.status_code == 404:
        error = NotFound(f"no such resource: {what}")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"{what} is not allowed", allow=_allowed_methods(request))
    else:
        error = InvalidArgument(f"{what}: {exc.detail}")
    return await _memvault_error(request, error)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette names only the first route's);
    HEAD wherever GET is (``HeadAsGet`` answers it for every GET route)."""
    served = {
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in request.app.router.routes
        )
    }
    if "GET" in served:
        served.add("HEAD")
    return [method for method in _METHODS if method in served]


async def _client_gone(request: Request, exc: Exception) -> Response:
    # Nobody is listening; the session core already released what the request held.
    log.info("request.client_disconnected", method=request.method, path=request.url.path)
    return Response(status_code=499)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("request.failed", method=request.method, path=request.url.path)
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.rejected(Internal.code, None)
    return problem_response(Internal("internal error; the server log has the details"))


class LastResort:
    """An exception nothing else handled becomes a 500 problem here, and the connection lives.

    Registered as a handler for ``Exception``, Starlette's ``ServerErrorMiddleware`` answers
    and then re-raises, and uvicorn, seeing an exception after the answer began, closes the
    connection without having said ``Connection: close``: a client's next request on it
    fails with a dropped connection. Outermost of the app's own middleware, this answers and
    returns. Once an answer has begun (an asset body cut short) it re-raises: closing the
    connection is the only way left to tell the client the body is incomplete.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        task = asyncio.current_task()
        running: set[asyncio.Task[Any]] = scope["app"].state.requests
        if task is not None:
            running.add(task)
        try:
            await self._answer(scope, receive, send)
        finally:
            running.discard(task)

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if started:
                raise
            response = await _unexpected(Request(scope), exc)
            await response(scope, receive, send)
        except asyncio.CancelledError as cancelled:
            # uvicorn cancels the requests still running when a graceful shutdown runs out
            # of time (a rolling restart with a slow chunk in flight), then logs each one's
            # traceback and answers a text/plain 500. The client is told to come back
            # instead; the request's own cleanup has run on the way out. Only that one
            # cancellation: any other (a client's task, in-process) goes on up.
            if started or _SHUTDOWN not in str(cancelled):
                raise
            log.warning("request.cut_by_shutdown", method=scope["method"], path=scope["path"])
            error = Unavailable("the server is shutting down: send this request again",
                                retry_after=1)
            response = problem_response(error)
            response.headers["Connection"] = "close"
            await response(scope, receive, send)


_SHUTDOWN = "graceful shutdown exceeded"
"""In the message of uvicorn's cancellation of requests still running at shutdown."""


_PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; clients switch on `code`, and the other "
                   "members (e.g. `limit_name`, `missing`, `retry_after`) say more",
    "type": "object",
    "required": ["type", "title", "status", "code", "detail"],
    "properties": {
        "type": {"type": "string"}, "title": {"type": "string"},
        "status": {"type": "integer"}, "code": {"type": "string"},
        "detail": {"type": "string"},
    },
    "additionalProperties": True,
}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}}


def document(app: FastAPI) -> None:
    """Make ``/openapi.json`` say what the server answers on error: a problem document, and
    for a malformed request 400 ``invalid_argument`` (FastAPI's default documents 422 with
    its own shape, which this API never sends: here 422 is a checksum or length mismatch)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                             routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        components["Problem"] = _PROBLEM_SCHEMA
        # Every /v1 route takes a bearer token (the `caller` dependency reads the header
        # itself); saying so lets /docs send one.
        schema["components"]["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "a token from `memvault token create NAME` (or `admin.token`)"}}
        for path, path_item in schema.get("paths", {}).items():
            for operation in path_item.values():
                if path.startswith("/v1/"):
                    operation["security"] = [{"bearer": []}]
                responses = operation.setdefault("responses", {})
                if responses.pop("422", None) is not None:
                    responses["400"] = _problem(
                        "invalid_argument: a malformed request (the problem's `errors` "
                        "say which fields)")
                responses["default"] = _problem(
                    "any other error: see the error table in README (`code` and status)")
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI) -> None:
    """The handlers; call after adding the app's other middleware (``LastResort`` goes
    outside them, so it sees what they raise too)."""
    document(app)
    app.add_exception_handler(MemvaultError, _memvault_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_middleware(LastResort)
