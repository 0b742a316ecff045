"""Every error memvault reports, each with a stable ``code`` and an HTTP status.

The hierarchy is flat on purpose: one base class, one subclass per code::

    MemvaultError
     ├── Unauthenticated        401 unauthenticated
     ├── Forbidden              403 forbidden           (authenticated, but not an admin)
     ├── NotFound               404 not_found
     ├── InvalidArgument        400 invalid_argument
     ├── MethodNotAllowed       405 method_not_allowed
     ├── RequestTimeout         408 timeout             (a transfer ran past its time limit)
     ├── Conflict               409 conflict
     ├── Incomplete             409 incomplete          (carries the missing chunk indices)
     ├── Expired                410 expired
     ├── PreconditionFailed     412 precondition_failed (If-Match names another version)
     ├── PayloadTooLarge        413 payload_too_large
     ├── RangeNotSatisfiable    416 range_not_satisfiable
     ├── ChecksumMismatch       422 checksum_mismatch
     ├── LengthMismatch         422 length_mismatch
     ├── ResourceExhausted      429 resource_exhausted  (carries Retry-After)
     ├── Unavailable            503 unavailable         (carries Retry-After; transient)
     ├── InsufficientStorage    507 insufficient_storage
     ├── HeadersTooLarge        431 headers_too_large
     └── Internal               500 internal

Services raise these; the HTTP layer renders them as RFC 9457 problem documents and the SDK
maps the same codes back to the same classes. Anything that is not a ``MemvaultError`` is a
bug and is rendered as ``internal`` after being logged with its traceback.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar


class MemvaultError(Exception):
    """Base class: a failure a caller can act on, with a stable machine-readable code."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"

    def __init__(
        self,
        detail: str,
        *,
        retry_after: float | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after
        self.extra: dict[str, Any] = extra

    def headers(self) -> dict[str, str]:
        """HTTP headers that belong with this error (``Retry-After`` and the like)."""
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}

    def to_problem(self) -> dict[str, Any]:
        """The RFC 9457 body: standard members first, then the numbers behind the error."""
        body: dict[str, Any] = {
            "type": f"https://memvault.dev/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
        }
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        body.update(self.extra)
        return body


class Unauthenticated(MemvaultError):
    code = "unauthenticated"
    status = 401
    title = "Missing or invalid credentials"

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "WWW-Authenticate": 'Bearer realm="memvault"'}


class Forbidden(MemvaultError):
    """Only for operator endpoints: a capsule someone may not see is ``not_found`` instead."""

    code = "forbidden"
    status = 403
    title = "Not allowed"


class NotFound(MemvaultError):
    code = "not_found"
    status = 404
    title = "Not found"


class InvalidArgument(MemvaultError):
    code = "invalid_argument"
    status = 400
    title = "Invalid argument"


class MethodNotAllowed(MemvaultError):
    code = "method_not_allowed"
    status = 405
    title = "Method not allowed"

    def headers(self) -> dict[str, str]:
        allow = self.extra.get("allow")
        return {**super().headers(), **({"Allow": ", ".join(allow)} if allow else {})}


class RequestTimeout(MemvaultError):
    code = "timeout"
    status = 408
    title = "Transfer took too long"

    def headers(self) -> dict[str, str]:
        # The rest of the body may still come: nothing after this answer on the connection
        # could be told apart from it (RFC 9110 §15.5.9).
        return {**super().headers(), "Connection": "close"}


class Conflict(MemvaultError):
    code = "conflict"
    status = 409
    title = "Conflict with stored state"


class Incomplete(MemvaultError):
    code = "incomplete"
    status = 409
    title = "Upload incomplete"


class Expired(MemvaultError):
    code = "expired"
    status = 410
    title = "Upload session expired"


class PreconditionFailed(MemvaultError):
    code = "precondition_failed"
    status = 412
    title = "Precondition failed"


class PayloadTooLarge(MemvaultError):
    code = "payload_too_large"
    status = 413
    title = "Payload too large"


class RangeNotSatisfiable(MemvaultError):
    code = "range_not_satisfiable"
    status = 416
    title = "Range not satisfiable"

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "Content-Range": f"bytes */{self.extra['size']}"}


class ChecksumMismatch(MemvaultError):
    code = "checksum_mismatch"
    status = 422
    title = "Checksum mismatch"


class LengthMismatch(MemvaultError):
    code = "length_mismatch"
    status = 422
    title = "Length mismatch"


class ResourceExhausted(MemvaultError):
    code = "resource_exhausted"
    status = 429
    title = "Limit reached"


class Unavailable(MemvaultError):
    code = "unavailable"
    status = 503
    title = "Temporarily unavailable"


class InsufficientStorage(MemvaultError):
    code = "insufficient_storage"
    status = 507
    title = "Insufficient storage"


class HeadersTooLarge(MemvaultError):
    code = "headers_too_large"
    status = 431
    title = "Request header fields too large"


class Internal(MemvaultError):
    code = "internal"
    status = 500
    title = "Internal error"


ERRORS: dict[str, type[MemvaultError]] = {
    cls.code: cls
    for cls in (
        Unauthenticated,
        Forbidden,
        NotFound,
        InvalidArgument,
        MethodNotAllowed,
        RequestTimeout,
        Conflict,
        Incomplete,
        Expired,
        PreconditionFailed,
        PayloadTooLarge,
        RangeNotSatisfiable,
        ChecksumMismatch,
        LengthMismatch,
        ResourceExhausted,
        Unavailable,
        InsufficientStorage,
        HeadersTooLarge,
        Internal,
    )
}
"""Code → class, the one table both the server and the SDK use."""
