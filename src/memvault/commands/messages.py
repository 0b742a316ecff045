"""Errors as sentences a person can act on: what went wrong, and what to do about it."""

from __future__ import annotations

import errno

from memvault.client import (
    BadResponse,
    ChecksumMismatch,
    ConnectionFailed,
    FileChanged,
    Forbidden,
    InsufficientStorage,
    MemvaultError,
    NotFound,
    PayloadTooLarge,
    ResourceExhausted,
    Unauthenticated,
)


class NotARegularFile(OSError):
    """A path named to upload that is a pipe, a socket or a device."""


_LOCAL_CODES = {
    errno.ENOENT: "file_not_found",
    errno.ELOOP: "file_not_found",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.EISDIR: "is_a_folder",
    errno.ENOTDIR: "not_a_folder",
    errno.EEXIST: "file_exists",
    errno.ENOSPC: "no_space_left",
    errno.EDQUOT: "no_space_left",
    errno.EROFS: "read_only",
    errno.ENAMETOOLONG: "name_too_long",
}


def local_code(error: BaseException) -> str:
    """The stable code of a local failure (a file or folder on this machine), in the server
    codes' style: scripts reading ``--json`` match on it."""
    if isinstance(error, NotARegularFile):
        return "not_a_regular_file"
    if isinstance(error, OSError):
        return _LOCAL_CODES.get(error.errno or 0, "os_error")
    return "local_error"


def sentence(error: BaseException, *, url: str = "") -> str:
    """One line for ``error``, starting with its code."""
    if isinstance(error, OSError) and error.strerror:
        # Without "[Errno 2]" and the file name: the line names the file already.
        advice = " — check that you may read it" \
            if isinstance(error, PermissionError) else ""
        return f"{local_code(error)}: {error.strerror}{advice}"
    if not isinstance(error, MemvaultError):
        return f"{local_code(error)}: {type(error).__name__}: {error}"
    code = error.code
    if isinstance(error, ConnectionFailed):
        cause = error.__cause__
        why = f" ({type(cause).__name__}: {cause})" if cause and str(cause) else ""
        return (f"{code}: cannot reach the memvault server at {url or 'the configured URL'}"
                f"{why} — is it running? Check the address with `memvault login URL "
                "--token TOKEN`")
    if isinstance(error, Unauthenticated):
        return (f"{code}: the server did not accept your token — log in again with "
                "`memvault login URL --token TOKEN`")
    if isinstance(error, Forbidden):
        return (f"{code}: this needs an administrator's token — log in with one "
                "(`memvault token create NAME --admin` on the server makes one)")
    if isinstance(error, NotFound) and "name" in error.extra:
        name = error.extra["name"]
        return (f"{code}: capsule {name!r} not found — create it with "
                f"`memvault capsule create {_quote(name)}`")
    if isinstance(error, ResourceExhausted):
        if error.extra.get("limit_name") == "pending_sessions_per_capsule":
            # Its Retry-After is when the oldest pending upload expires (up to a day): a
            # place frees as soon as any of them finishes or is aborted.
            return (f"{code}: {error.detail} — `memvault sessions` lists them; run the "
                    "command again once some have finished, or with fewer --jobs")
        wait = f" — try again in {_duration(error.retry_after)}" if error.retry_after else ""
        return f"{code}: {error.detail}{wait}"
    if isinstance(error, InsufficientStorage):
        return f"{code}: the server is short of storage: {error.detail}"
    if isinstance(error, PayloadTooLarge):
        return f"{code}: {error.detail} — the server does not take files this large"
    if isinstance(error, ChecksumMismatch) and error.extra.get("during") == "download":
        return (f"{code}: {error.detail} — the partial download was removed; run the command "
                "again, and if it fails the same way the stored bytes may be damaged")
    if isinstance(error, ChecksumMismatch) and error.extra.get("during") == "read":
        return f"{code}: {error.detail} — run the command again"
    if isinstance(error, ChecksumMismatch):
        return (f"{code}: the bytes the server holds do not match the file ({error.detail}); "
                "it was probably changed while it was being uploaded — run the command again")
    if isinstance(error, FileChanged):
        return f"{code}: {error.detail} — run the command again once the file is complete"
    if isinstance(error, BadResponse):
        return (f"{code}: {error.detail} — is {url or 'the URL'} a memvault server, or is a "
                "proxy in the way?")
    return f"{code}: {error.detail}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


def _quote(name: str) -> str:
    return name if name.replace("-", "").replace("_", "").isalnum() else repr(name)
