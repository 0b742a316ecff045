"""``HEAD`` for every ``GET`` route (RFC 9110 §9.3.2: a general-purpose server supports it).

FastAPI routes answer only the methods they declare, so ``HEAD /healthz`` was a 405 and a
load balancer checking with HEAD saw the service down. A HEAD that no route declares runs as
the GET it stands for, with the same status and headers (``Content-Length`` included) and no
body. The asset route declares its own HEAD, which finds the blob without reading it.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_OWN_HEAD = re.compile(r"^/v1/memories/[^/]+/assets/[^/]+$")


class HeadAsGet:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] != "HEAD"
                or _OWN_HEAD.match(scope["path"])):
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)
