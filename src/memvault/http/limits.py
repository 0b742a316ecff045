"""Request hygiene that applies before any route runs: the size of JSON bodies.

Chunk bodies are exempt (their length is the session's business and is checked exactly);
every other request body is JSON and small, so a declared ``Content-Length`` over the limit
is refused before a byte is read, and a body sent without one is cut off at the limit.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from memvault.errors import PayloadTooLarge
from memvault.http.direct import CHUNK_PATH
from memvault.http.problems import problem_response


class JsonBodyLimit:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or CHUNK_PATH.match(scope["path"]):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await problem_response(self._too_large())(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._too_large()
            return message

        await self.app(scope, limited, send)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body is larger than {self.limit} bytes", limit=self.limit,
            limit_name="max_json_bytes",
        )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
