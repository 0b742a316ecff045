"""What the SDK raises, and the one place a server answer becomes an exception.

Every failure the server reports is raised as the class ``memvault.errors`` declares for its
``code`` (``ERRORS``: the one table the server and the SDK share), carrying the problem's
``detail``, its ``retry_after`` and every other member of the body in ``extra`` (``missing``,
``limit_name``, ``expected``, ...). Failures seen on this side have their own classes::

    MemvaultError                       memvault.errors: .code, .status, .detail, .extra
     ├── NotFound, Conflict, ...        one class per server code (the server's own classes)
     ├── UnknownError                   a code this SDK does not know (a newer server's)
     └── ClientError                    failures seen on the client's side
          ├── ConnectionFailed          the server could not be reached (after retries)
          ├── BadResponse               an answer that is not memvault's (a proxy's HTML 502)
          └── FileChanged               the local file changed while it was being uploaded
    UploadMemoryError (ExceptionGroup)  upload_memory: each failed lane's real error, noted

``code`` and ``status`` are class attributes (one class per code), except where one class
stands for answers of many: an ``UnknownError``'s ``.code`` is the server's code and its
``.status`` the answer's HTTP status, and a ``BadResponse``'s ``.status`` is the status the
foreign answer came with (``.http_status`` too), each set on the instance. Other client-side
errors have ``status`` 0: no HTTP answer was read.

``except MemvaultError`` therefore means "the server, or the way to it, said no" (plus a file
that changed under its upload). Failures of this machine are Python's own and stay outside it:
``OSError`` (a file cannot be read or written), ``ValueError`` (a bad argument, an empty
derivative, a malformed URL), ``TimeoutError`` and ``memvault.client.workers.WorkerDied`` (the
derivative worker process ran too long or died). ``WorkerDied`` is exported but is not a
``MemvaultError`` on purpose: it is one of lane B's local failures, next to the ``OSError``
and ``TimeoutError`` the same worker raises, and catching one of them but not the others as a
server failure would be wrong; a caller sees it only inside ``UploadMemoryError`` (the
original is stored, the server makes the derivatives), where ``except*`` picks it out.

Transient failures (connection errors, 5xx but 507, 408, 429) are retried before any of this
is raised; see ``memvault.client.retry``.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any, ClassVar

import httpx

from memvault.errors import (
    ERRORS,
    ChecksumMismatch,
    Conflict,
    Expired,
    Forbidden,
    HeadersTooLarge,
    Incomplete,
    InsufficientStorage,
    Internal,
    InvalidArgument,
    LengthMismatch,
    MemvaultError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    RangeNotSatisfiable,
    RequestTimeout,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

Timeout = RequestTimeout
"""408 ``timeout``: a chunk body arrived too slowly (the SDK sends it again before raising)."""

__all__ = [
    "BadResponse",
    "ChecksumMismatch",
    "ClientError",
    "Conflict",
    "ConnectionFailed",
    "Expired",
    "FileChanged",
    "Forbidden",
    "HeadersTooLarge",
    "Incomplete",
    "InsufficientStorage",
    "Internal",
    "InvalidArgument",
    "LengthMismatch",
    "MemvaultError",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "PreconditionFailed",
    "RangeNotSatisfiable",
    "RequestTimeout",
    "ResourceExhausted",
    "Timeout",
    "Unauthenticated",
    "Unavailable",
    "UnknownError",
    "UploadMemoryError",
    "from_response",
]

_STANDARD = frozenset({"type", "title", "status", "code", "detail", "retry_after"})


def _own(error: MemvaultError, *, code: str | None = None, status: int) -> None:
    """Give ``error`` its own ``code``/``status``, shadowing its class's. They are ClassVars
    of ``MemvaultError`` (to a type checker, not to be set on an instance); for the two
    classes that stand for many answers the instance's values are the truth."""
    vars(error).update({"status": status} if code is None else {"code": code, "status": status})


class UnknownError(MemvaultError):
    """A problem whose ``code`` this SDK does not know (a newer server's, or a proxy speaking
    RFC 9457): ``.code`` is the server's code, ``.status`` the answer's HTTP status.

    Not mapped to a known class by its status: a 409 of a new code is not a ``Conflict``
    (``capsule(create=True)`` takes a ``Conflict`` as "made meanwhile"), and a 418 is not a
    500. It is retried only if its status is (5xx but 501/505/507, 408, 429: as
    ``retry`` judges any answer it cannot read), else raised at once.
    """

    code: ClassVar[str] = "unknown"
    status: ClassVar[int] = 0
    title: ClassVar[str] = "Unknown error"

    def __init__(self, detail: str, *, code: str = "unknown", http_status: int = 0,
                 **extra: Any) -> None:
        super().__init__(detail, **extra)
        _own(self, code=code, status=http_status)
        self.http_status = http_status


class ClientError(MemvaultError):
    """A failure on the client's side of the wire; ``status`` is 0 (no HTTP status applies),
    but for a ``BadResponse``, which has the status the foreign answer came with."""

    code: ClassVar[str] = "client_error"
    status: ClassVar[int] = 0
    title: ClassVar[str] = "Client error"


class ConnectionFailed(ClientError):
    """The server could not be reached, or the connection broke, on every attempt.

    The ``httpx`` exception of the last attempt is chained as ``__cause__``.
    """

    code = "connection_failed"
    title = "Cannot reach the server"


class BadResponse(ClientError):
    """An answer that is not a memvault one: a non-JSON error page, or JSON of another shape.

    ``status`` (and ``http_status``, the same) is the status it came with: often a proxy's
    502 or 504, a 2xx for a captive portal's page, 0 only where none was read.
    """

    code = "bad_response"
    title = "Unexpected answer"

    def __init__(self, detail: str, *, http_status: int = 0, **extra: Any) -> None:
        super().__init__(detail, http_status=http_status, **extra)
        _own(self, status=http_status)
        self.http_status = http_status


class FileChanged(ClientError):
    """The local file's size, modification time or bytes changed during its upload."""

    code = "file_changed"
    title = "File changed during upload"


class UploadMemoryError(ExceptionGroup[Exception]):
    """``upload_memory`` failed in one lane or both: each sub-exception is that lane's real,
    typed error (``except* NotFound`` works), with a note naming the lane.

    ``memory_id`` is the memory the upload was filling (None if lane A never began); when only
    lane B (derivatives) failed, the original is stored and the server makes the derivatives
    itself.
    """

    memory_id: str | None = None


def retry_after(response: httpx.Response, body: dict[str, Any] | None = None) -> float | None:
    """Seconds to wait from ``Retry-After`` (delta-seconds or an HTTP date), else the body's
    ``retry_after``; None when neither says."""
    raw = response.headers.get("retry-after")
    if raw is not None:
        raw = raw.strip()
        if raw.isdigit():
            return float(raw)
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            return max(0.0, when.timestamp() - time.time())
    if body is not None and isinstance(body.get("retry_after"), int | float):
        return float(body["retry_after"])
    return None


def from_response(response: httpx.Response) -> MemvaultError:
    """The exception for an error answer: the class of its problem ``code``, else
    ``BadResponse`` (an answer from something that is not memvault)."""
    body: Any = None
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("code"), str):
        text = response.text[:200].strip().replace("\n", " ")
        return BadResponse(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code} {response.reason_phrase} without a memvault problem body"
            + (f": {text!r}" if text else ""),
            http_status=response.status_code,
            retry_after=retry_after(response),  # a proxy's 429/503 may say how long too
        )
    code = body["code"]
    detail = str(body.get("detail") or body.get("title") or code)
    extra = {k: v for k, v in body.items() if k not in _STANDARD}
    cls = ERRORS.get(code)
    if cls is None:
        extra.pop("http_status", None)  # (the answer's own status is the one that counts)
        return UnknownError(detail, code=code, http_status=response.status_code,
                            retry_after=retry_after(response, body), **extra)
    return cls(detail, retry_after=retry_after(response, body), **extra)
