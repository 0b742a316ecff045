"""The memvault Python SDK: ``AsyncClient`` and its blocking twin ``Client``.

    >>> from memvault import Client
    >>> with Client("http://127.0.0.1:8080", token) as mv:          # doctest: +SKIP
    ...     family = mv.capsule("family", create=True)
    ...     memory = mv.upload_memory("IMG_0001.jpg", capsule=family)
    ...     sorted(memory.assets)
    ['display', 'original', 'placeholder', 'thumb']

Modules: ``async_client`` (the API), ``sync_client`` (the same API, blocking), ``upload``
(one resumable chunked upload), ``lanes`` (``upload_memory``'s two lanes), ``workers``
(derivatives in a worker process), ``download`` (Range-resumed, verified reads),
``transport`` + ``retry`` (requests, retries, backoff), ``errors`` (typed failures),
``state`` (local resume records), ``source`` (what an upload reads), ``models`` (results).
"""

from memvault.client.async_client import AsyncClient
from memvault.client.errors import (
    BadResponse,
    ChecksumMismatch,
    ClientError,
    Conflict,
    ConnectionFailed,
    Expired,
    FileChanged,
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
    Timeout,
    Unauthenticated,
    Unavailable,
    UploadMemoryError,
)
from memvault.client.models import (
    Asset,
    Capsule,
    Memory,
    MemoryPage,
    Progress,
    Session,
    UploadResult,
)
from memvault.client.retry import RetryPolicy
from memvault.client.sync_client import Client

__all__ = [
    "Asset",
    "AsyncClient",
    "BadResponse",
    "Capsule",
    "ChecksumMismatch",
    "Client",
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
    "Memory",
    "MemoryPage",
    "MemvaultError",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "PreconditionFailed",
    "Progress",
    "RangeNotSatisfiable",
    "RequestTimeout",
    "ResourceExhausted",
    "RetryPolicy",
    "Session",
    "Timeout",
    "Unauthenticated",
    "Unavailable",
    "UploadMemoryError",
    "UploadResult",
]
