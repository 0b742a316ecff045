"""ASGI apps that only drain a request body: the HTTP layer's ceiling, without memvault.

Loaded by bench/http_ceiling.py as ``uvicorn --app-dir bench _drain_app:<name>``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse
from starlette.routing import Route

fastapi_app = FastAPI()


@fastapi_app.put("/c/{index}")
async def _drain(index: int, request: Request) -> dict[str, int]:
    total = 0
    async for piece in request.stream():
        total += len(piece)
    return {"index": index, "bytes": total}


async def _starlette_drain(request: StarletteRequest) -> JSONResponse:
    total = 0
    async for piece in request.stream():
        total += len(piece)
    return JSONResponse({"bytes": total})


starlette_app = Starlette(routes=[Route("/c/{index}", _starlette_drain, methods=["PUT"])])


async def raw_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    total = 0
    while True:
        message = await receive()
        total += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"bytes":%d}' % total})
