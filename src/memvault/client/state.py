"""Resume state kept on the local disk: which session an interrupted upload was filling.

One small JSON file per upload, named by a hash of (server, capsule, memory, role, path), in
the user's state directory (``platformdirs``: ``~/.local/state/memvault/uploads`` on Linux;
``MEMVAULT_STATE_DIR`` or ``AsyncClient(state_dir=...)`` override it). Each file records the
file's fingerprint; a record whose fingerprint no longer matches the file describes another
version of it, and its session is aborted rather than resumed. Writes go through a temporary
file and ``os.replace``, so a crash leaves the old record or the new one, never half of one.
Records are removed when their upload finishes. The store is a cache: a folder that cannot
be written (a read-only home, a service user without one) is logged once as a warning, and
uploads go on without records (an interrupted one then starts over).

The CLI also remembers each file's SHA-256 (``hashes/``), keyed by its fingerprint, so a
second run need not read it. ``prune`` drops hash records not used for ``HASH_KEEP`` and
upload records older than ``UPLOAD_KEEP`` (far beyond any server's session lifetime: their
sessions are gone, and a resume would begin again anyway); ``memvault upload`` runs it once
per invocation (and the client before its first upload), so the folder does not grow for
ever.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import BaseModel, ValidationError

log = logging.getLogger("memvault.client")

HASH_KEEP = 180 * 86400.0
UPLOAD_KEEP = 30 * 86400.0


def default_state_dir() -> Path:
    env = os.environ.get("MEMVAULT_STATE_DIR")
    return Path(env) if env else Path(platformdirs.user_state_dir("memvault"))


class UploadRecord(BaseModel):
    session_id: str
    fingerprint: str
    server: str
    capsule_id: str
    role: str
    memory_id: str | None
    path: str
    saved_at: float


class StateStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._warned = False

    def _unusable(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning("cannot keep resume records in %s (%s: %s); uploads go on, but an "
                        "interrupted one will start over", self.root, type(exc).__name__,
                        exc.strerror or exc)

    @staticmethod
    def key(*parts: str | None) -> str:
        return hashlib.sha256("\x00".join(p or "" for p in parts).encode()).hexdigest()

    def _file(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.json"

    def _read(self, kind: str, key: str) -> dict[str, Any] | None:
        try:
            raw = self._file(kind, key).read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._unusable(exc)
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None  # a damaged record is as good as none: the upload starts over
        return data if isinstance(data, dict) else None

    def _write(self, kind: str, key: str, data: dict[str, Any]) -> None:
        folder = self.root / kind
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
        except OSError as exc:
            self._unusable(exc)
            return
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self._file(kind, key))
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not isinstance(exc, OSError):
                raise
            self._unusable(exc)

    def _drop(self, kind: str, key: str) -> None:
        try:
            self._file(kind, key).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._unusable(exc)

    def _records(self, kind: str) -> list[Path]:
        try:
            return sorted((self.root / kind).glob("*.json"))
        except OSError as exc:
            self._unusable(exc)
            return []

    def load_upload(self, key: str) -> UploadRecord | None:
        data = self._read("uploads", key)
        if data is None:
            return None
        try:
            return UploadRecord.model_validate(data)
        except ValidationError:
            return None

    def save_upload(self, key: str, record: UploadRecord) -> None:
        self._write("uploads", key, record.model_dump())

    def drop_upload(self, key: str) -> None:
        self._drop("uploads", key)

    def drop_session(self, session_id: str) -> None:
        """Forget every record of ``session_id`` (it was aborted, or is gone)."""
        for path in self._records("uploads"):
            record = self.load_upload(path.stem)
            if record is not None and record.session_id == session_id:
                self.drop_upload(path.stem)

    def uploads(self) -> list[UploadRecord]:
        """Every recorded (unfinished) upload."""
        out = []
        for path in self._records("uploads"):
            record = self.load_upload(path.stem)
            if record is not None:
                out.append(record)
        return out

    def load_hash(self, key: str) -> str | None:
        data = self._read("hashes", key)
        value = data.get("sha256") if data else None
        if not isinstance(value, str):
            return None
        with contextlib.suppress(OSError):
            os.utime(self._file("hashes", key))  # used: kept by prune for another while
        return value

    def save_hash(self, key: str, sha256: str) -> None:
        self._write("hashes", key, {"sha256": sha256, "saved_at": time.time()})

    def drop_hash(self, key: str) -> None:
        self._drop("hashes", key)

    def prune(self, now: float | None = None) -> int:
        """Drop hash records unused for ``HASH_KEEP`` and upload records older than
        ``UPLOAD_KEEP`` (by file time); returns how many went."""
        now = time.time() if now is None else now
        dropped = 0
        for kind, keep in (("hashes", HASH_KEEP), ("uploads", UPLOAD_KEEP)):
            for path in self._records(kind):
                with contextlib.suppress(OSError):
                    if path.stat().st_mtime < now - keep:
                        path.unlink()
                        dropped += 1
        return dropped
