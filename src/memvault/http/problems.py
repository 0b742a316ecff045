"""The one place errors become HTTP responses (RFC 9457 ``application/problem+json``)."""

from __future__ import annotations

import math

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from memvault.errors import ERRORS, Internal, InvalidArgument, MemvaultError

log = structlog.get_logger("memvault.http")

PROBLEM = "application/problem+json"


def problem_response(error: MemvaultError) -> JSONResponse:
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return JSONResponse(
        error.to_problem(), status_code=error.status, headers=headers, media_type=PROBLEM
    )


async def _memvault_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MemvaultError)
    log.info("request.rejected", method=request.method, path=request.url.path,
             code=exc.code, detail=exc.detail)
    return problem_response(exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    where = ", ".join(".".join(str(p) for p in e["loc"]) + ": " + e["msg"] for e in errors)
    return await _memvault_error(
        request, InvalidArgument(f"request is not valid: {where}", errors=errors)
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    # Routing errors (unknown path, wrong method) in the same problem shape as everything else.
    code = {404: "not_found", 405: "invalid_argument"}.get(exc.status_code, "invalid_argument")
    error = ERRORS[code](str(exc.detail))
    response = problem_response(error)
    response.status_code = exc.status_code
    return response


async def _client_gone(request: Request, exc: Exception) -> Response:
    # Nobody is listening; the session core already released what the request held.
    log.info("request.client_disconnected", method=request.method, path=request.url.path)
    return Response(status_code=499)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("request.failed", method=request.method, path=request.url.path)
    return problem_response(Internal("internal error; the server log has the details"))


def install(app: FastAPI) -> None:
    app.add_exception_handler(MemvaultError, _memvault_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
