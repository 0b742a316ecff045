"""memvault: resumable, verified uploads of memories into capsules.

The package is the server (``memvault serve``) and its Python client; the client's public
API is listed here once::

    from memvault import Client            # or AsyncClient
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from memvault.client import (
        UNSET,
        Asset,
        AsyncClient,
        BadResponse,
        Capsule,
        CapsuleRef,
        ChecksumMismatch,
        Client,
        ClientError,
        Conflict,
        ConnectionFailed,
        Derivatives,
        Expired,
        FileChanged,
        Forbidden,
        HeadersTooLarge,
        Incomplete,
        InsufficientStorage,
        Internal,
        InvalidArgument,
        LengthMismatch,
        Memory,
        MemoryPage,
        MemoryRef,
        MemvaultError,
        MethodNotAllowed,
        NotFound,
        PathOrStream,
        PayloadTooLarge,
        PreconditionFailed,
        Progress,
        ProgressCallback,
        RangeNotSatisfiable,
        RequestTimeout,
        ResourceExhausted,
        RetryPolicy,
        Session,
        Timeout,
        Unauthenticated,
        Unavailable,
        UnknownError,
        Unset,
        UploadMemoryError,
        UploadResult,
        WorkerDied,
    )

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
    "__version__",
]


if not TYPE_CHECKING:
    # Only at run time: to a type checker the names above are the module's whole surface, so
    # ``memvault.Clinet`` or ``except memvault.Error`` is an error there rather than ``Any``.

    def __getattr__(name: str) -> Any:
        """The client is imported on first use, so the server and the CLI's server commands
        do not pay for it (httpx, the derivatives module) at start-up."""
        if name in __all__ and name != "__version__":
            from memvault import client

            return getattr(client, name)
        raise AttributeError(f"module 'memvault' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy names too, so ``dir(memvault)`` and completion show the client's API."""
    return sorted({*globals(), *__all__})
