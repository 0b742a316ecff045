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

Besides the clients, models and errors, the names a wrapper of its own needs to be typed are
exported here: ``CapsuleRef``/``MemoryRef`` (an object or its id), ``PathOrStream``,
``ProgressCallback``, ``Derivatives`` (``upload_memory``'s), ``Unset``/``UNSET``
(``update_memory``'s "leave as is"), and ``WorkerDied`` (found inside ``UploadMemoryError``).
"""

from memvault.client.async_client import (
    UNSET,
    AsyncClient,
    CapsuleRef,
    MemoryRef,
    PathOrStream,
    Unset,
)
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
    UnknownError,
    UploadMemoryError,
)
from memvault.client.lanes import Derivatives
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
from memvault.client.upload import ProgressCallback
from memvault.client.workers import WorkerDied

__all__ = [
    "UNSET",
    "Asset",
    "AsyncClient",
    "BadResponse",
    "Capsule",
    "CapsuleRef",
    "ChecksumMismatch",
    "Client",
    "ClientError",
    "Conflict",
    "ConnectionFailed",
    "Derivatives",
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
    "MemoryRef",
    "MemvaultError",
    "MethodNotAllowed",
    "NotFound",
    "PathOrStream",
    "PayloadTooLarge",
    "PreconditionFailed",
    "Progress",
    "ProgressCallback",
    "RangeNotSatisfiable",
    "RequestTimeout",
    "ResourceExhausted",
    "RetryPolicy",
    "Session",
    "Timeout",
    "Unauthenticated",
    "Unavailable",
    "UnknownError",
    "Unset",
    "UploadMemoryError",
    "UploadResult",
    "WorkerDied",
]
