"""Resumable SHA-256 whose state can be stored as bytes and continued in another process.

The server hashes each upload's contiguous prefix as chunks arrive and keeps the running state
in the database, so a different or restarted worker can carry on. ``hashlib`` cannot export its
state, PyPI ``rehash`` refuses OpenSSL 3, and ``rehashes`` holds the GIL while hashing, which on
a small machine starves the event loop while a worker thread hashes. So the primary backend is a
ctypes binding to libcrypto's low-level ``SHA256_*`` functions (deprecated in OpenSSL 3 but still
exported); ctypes drops the GIL for the duration of each call. ``rehashes`` is the fallback.

Serialized states carry a tag naming the backend's layout, and either layout is translated into
whichever backend is running, so a state saved on one machine resumes on any other.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import struct
import threading
from typing import Any, Final, Literal, NamedTuple

try:
    import rehashes as _rehashes_mod
except ImportError:  # pragma: no cover - it is a declared dependency
    _rehashes_mod = None

__all__ = ["BACKEND", "Sha256State", "new_sha256"]

_BackendName = Literal["openssl", "rehashes"]

_TAG_OPENSSL: Final = 0x01
_TAG_REHASHES: Final = 0x02

_BLOCK: Final = 64
_DIGEST: Final = 32
# SHA-256 counts message length in a 64-bit *bit* counter.
_MAX_LENGTH: Final = (1 << 61) - 1

# SHA256_CTX serialized field by field, little-endian, so a blob means the same thing on any
# host; on x86-64/aarch64 this is byte-for-byte the in-memory struct.
_OPENSSL_FMT: Final = struct.Struct("<8I2I64s2I")
# rehashes 0.3 (RustCrypto ``digest`` SerializableState): h[8] as LE u32, LE u64 count of
# compressed blocks, buffer position, then the 63 bytes a position < 64 can use.
_REHASHES_FMT: Final = struct.Struct("<8IQB63s")

# The rehashes fallback holds the GIL inside each call; feeding it bounded slices lets the
# interpreter hand the GIL to the event loop between slices instead of after the whole buffer.
_REHASHES_SLICE: Final = 1 << 20


class _Parts(NamedTuple):
    """Backend-neutral SHA-256 state: chaining value, bytes hashed, bytes not yet compressed."""

    h: tuple[int, ...]
    length: int
    tail: bytes


class _Sha256Ctx(ctypes.Structure):
    # The layout has been unchanged from OpenSSL 0.9.8 through 3.x (and in LibreSSL).
    _fields_ = (
        ("h", ctypes.c_uint * 8),
        ("Nl", ctypes.c_uint),
        ("Nh", ctypes.c_uint),
        ("data", ctypes.c_ubyte * _BLOCK),
        ("num", ctypes.c_uint),
        ("md_len", ctypes.c_uint),
    )


class _PyBuffer(ctypes.Structure):
    # CPython's Py_buffer (part of the stable ABI since 3.11). Going through the buffer protocol
    # gives one zero-copy path for bytes, bytearray, read-only and sliced memoryviews and mmaps;
    # ctypes' own from_buffer() refuses read-only buffers.
    _fields_ = (
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    )


_PyBUF_SIMPLE: Final = 0

_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = (ctypes.POINTER(_PyBuffer),)
_release_buffer.restype = None


def _load_libcrypto() -> ctypes.CDLL | None:
    names = [ctypes.util.find_library("crypto"), "libcrypto.so.3", "libcrypto.so.1.1"]
    for name in dict.fromkeys(n for n in names if n):
        try:
            lib = ctypes.CDLL(name)
            init, update, final = lib.SHA256_Init, lib.SHA256_Update, lib.SHA256_Final
        except (OSError, AttributeError):
            continue
        init.argtypes = (ctypes.POINTER(_Sha256Ctx),)
        init.restype = ctypes.c_int
        update.argtypes = (ctypes.POINTER(_Sha256Ctx), ctypes.c_void_p, ctypes.c_size_t)
        update.restype = ctypes.c_int
        final.argtypes = (ctypes.c_char_p, ctypes.POINTER(_Sha256Ctx))
        final.restype = ctypes.c_int
        # A wrong guess about the struct would corrupt memory silently; prove it on a
        # multi-block input before trusting it.
        ctx = _Sha256Ctx()
        out = ctypes.create_string_buffer(_DIGEST)
        probe = bytes(range(256)) * 3 + b"memvault"
        if not (init(ctx) and update(ctx, probe, len(probe)) and final(out, ctx)):
            continue
        if out.raw != hashlib.sha256(probe).digest():
            continue
        return lib
    return None


_libcrypto: Final = _load_libcrypto()


class _OpenSSLImpl:
    __slots__ = ("_ctx",)

    def __init__(self, ctx: _Sha256Ctx | None = None) -> None:
        assert _libcrypto is not None
        if ctx is None:
            ctx = _Sha256Ctx()
            if not _libcrypto.SHA256_Init(ctx):
                raise RuntimeError("SHA256_Init failed")
        self._ctx = ctx

    def update(self, data: Any) -> None:
        assert _libcrypto is not None
        if isinstance(data, bytes):
            if not _libcrypto.SHA256_Update(self._ctx, data, len(data)):
                raise RuntimeError("SHA256_Update failed")
            return
        view = _PyBuffer()
        # Raises BufferError for non-contiguous views, TypeError for non-buffers.
        _get_buffer(data, view, _PyBUF_SIMPLE)
        try:
            ok = _libcrypto.SHA256_Update(self._ctx, view.buf, view.len)
        finally:
            _release_buffer(view)
        if not ok:
            raise RuntimeError("SHA256_Update failed")

    def copy(self) -> _OpenSSLImpl:
        return _OpenSSLImpl(_Sha256Ctx.from_buffer_copy(self._ctx))

    def digest(self) -> bytes:
        assert _libcrypto is not None
        # SHA256_Final pads and wipes the context, so it only ever sees a scratch copy.
        scratch = _Sha256Ctx.from_buffer_copy(self._ctx)
        out = ctypes.create_string_buffer(_DIGEST)
        if not _libcrypto.SHA256_Final(out, scratch):
            raise RuntimeError("SHA256_Final failed")
        return out.raw

    @property
    def length(self) -> int:
        return int((self._ctx.Nh << 32) | self._ctx.Nl) >> 3

    def to_bytes(self) -> bytes:
        c = self._ctx
        body = _OPENSSL_FMT.pack(*c.h, c.Nl, c.Nh, bytes(c.data), c.num, c.md_len)
        return bytes((_TAG_OPENSSL,)) + body

    @staticmethod
    def parse(body: bytes) -> _Parts:
        if len(body) != _OPENSSL_FMT.size:
            raise ValueError(f"openssl SHA-256 state must be {_OPENSSL_FMT.size} bytes")
        *h, nl, nh, data, num, md_len = _OPENSSL_FMT.unpack(body)
        bits = (nh << 32) | nl
        if md_len != _DIGEST or num >= _BLOCK or bits % 8 or (bits >> 3) % _BLOCK != num:
            raise ValueError("inconsistent openssl SHA-256 state")
        return _Parts(tuple(h), bits >> 3, data[:num])

    @classmethod
    def from_parts(cls, parts: _Parts) -> _OpenSSLImpl:
        ctx = _Sha256Ctx()
        ctx.h[:] = parts.h
        bits = parts.length * 8
        ctx.Nl, ctx.Nh = bits & 0xFFFFFFFF, bits >> 32
        ctypes.memmove(ctx.data, parts.tail, len(parts.tail))
        ctx.num = len(parts.tail)
        ctx.md_len = _DIGEST
        return cls(ctx)


class _RehashesImpl:
    __slots__ = ("_h", "_length")

    def __init__(self, h: Any = None, length: int = 0) -> None:
        assert _rehashes_mod is not None
        # rehashes keeps the byte count private; tracking it here avoids parsing on every read.
        self._h = _rehashes_mod.PySha256() if h is None else h
        self._length = length

    def update(self, data: Any) -> None:
        if isinstance(data, bytes) and len(data) <= _REHASHES_SLICE:
            self._h.update(data)
            self._length += len(data)
            return
        # rehashes accepts only bytes, so other buffers are copied one slice at a time.
        with memoryview(data) as mv, mv.cast("B") as flat:
            for start in range(0, flat.nbytes, _REHASHES_SLICE):
                self._h.update(bytes(flat[start : start + _REHASHES_SLICE]))
            self._length += flat.nbytes

    def copy(self) -> _RehashesImpl:
        return _RehashesImpl(_rehashes_mod.PySha256.deserialize(self._h.serialize()), self._length)

    def digest(self) -> bytes:
        # finalize() happens not to consume the state today, but nothing promises that.
        scratch = _rehashes_mod.PySha256.deserialize(self._h.serialize())
        return bytes.fromhex(scratch.finalize())

    @property
    def length(self) -> int:
        return self._length

    def to_bytes(self) -> bytes:
        return bytes((_TAG_REHASHES,)) + bytes(self._h.serialize())

    @staticmethod
    def parse(body: bytes) -> _Parts:
        if len(body) != _REHASHES_FMT.size:
            raise ValueError(f"rehashes SHA-256 state must be {_REHASHES_FMT.size} bytes")
        *h, blocks, pos, buf = _REHASHES_FMT.unpack(body)
        if pos >= _BLOCK or any(buf[pos:]):
            raise ValueError("inconsistent rehashes SHA-256 state")
        length = blocks * _BLOCK + pos
        if length > _MAX_LENGTH:
            raise ValueError("SHA-256 state length out of range")
        return _Parts(tuple(h), length, buf[:pos])

    @classmethod
    def from_parts(cls, parts: _Parts) -> _RehashesImpl:
        assert _rehashes_mod is not None
        blocks, pos = divmod(parts.length, _BLOCK)
        body = _REHASHES_FMT.pack(*parts.h, blocks, pos, parts.tail)
        try:
            h = _rehashes_mod.PySha256.deserialize(body)
        except ValueError as exc:
            raise ValueError(f"rehashes rejected SHA-256 state: {exc}") from exc
        return cls(h, parts.length)


_PARSERS: Final = {_TAG_OPENSSL: _OpenSSLImpl.parse, _TAG_REHASHES: _RehashesImpl.parse}

_AVAILABLE: Final[tuple[_BackendName, ...]] = (
    *(("openssl",) if _libcrypto is not None else ()),
    *(("rehashes",) if _rehashes_mod is not None else ()),
)
if not _AVAILABLE:  # pragma: no cover
    raise ImportError("memvault.hashing needs libcrypto or the rehashes package")

BACKEND: Final[str] = _AVAILABLE[0]
"""Which implementation new states use: ``"openssl"`` or ``"rehashes"``."""


def _impl_class(name: _BackendName | None) -> type[_OpenSSLImpl] | type[_RehashesImpl]:
    name = name or _AVAILABLE[0]
    if name not in _AVAILABLE:
        raise RuntimeError(f"SHA-256 backend {name!r} is not available here")
    return _OpenSSLImpl if name == "openssl" else _RehashesImpl


class Sha256State:
    """Resumable SHA-256 whose state can be saved as bytes and restored elsewhere.

    Safe to share between threads like a ``hashlib`` object: a lock serialises use, because the
    libcrypto backend works on the state with the GIL released.
    """

    __slots__ = ("_impl", "_lock")

    def __init__(self, *, _backend: _BackendName | None = None) -> None:
        self._impl: _OpenSSLImpl | _RehashesImpl = _impl_class(_backend)()
        self._lock = threading.Lock()

    @classmethod
    def _wrap(cls, impl: _OpenSSLImpl | _RehashesImpl) -> Sha256State:
        state = cls.__new__(cls)
        state._impl = impl
        state._lock = threading.Lock()
        return state

    @property
    def backend(self) -> _BackendName:
        """Which implementation this state runs on."""
        return "openssl" if isinstance(self._impl, _OpenSSLImpl) else "rehashes"

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Hash ``data`` (any C-contiguous buffer), without copying it on the openssl backend."""
        with self._lock:
            self._impl.update(data)

    def copy(self) -> Sha256State:
        with self._lock:
            return self._wrap(self._impl.copy())

    def digest(self) -> bytes:
        """The digest of everything hashed so far; the state can keep being updated."""
        with self._lock:
            return self._impl.digest()

    def hexdigest(self) -> str:
        return self.digest().hex()

    @property
    def length(self) -> int:
        """Number of bytes hashed so far."""
        with self._lock:
            return self._impl.length

    def to_bytes(self) -> bytes:
        """The state as bytes: a format tag naming the backend's layout, then that layout."""
        with self._lock:
            return self._impl.to_bytes()

    @classmethod
    def from_bytes(
        cls, blob: bytes | bytearray | memoryview, *, _backend: _BackendName | None = None
    ) -> Sha256State:
        """Restore a state saved by :meth:`to_bytes` on any backend into the running one.

        Raises ``ValueError`` for an unknown tag, a wrong length or an inconsistent state.
        """
        blob = bytes(blob)
        if not blob:
            raise ValueError("empty SHA-256 state")
        parser = _PARSERS.get(blob[0])
        if parser is None:
            raise ValueError(f"unknown SHA-256 state format tag {blob[0]:#04x}")
        return cls._wrap(_impl_class(_backend).from_parts(parser(blob[1:])))

    def __repr__(self) -> str:
        return f"<Sha256State backend={self.backend} length={self.length}>"


def new_sha256() -> Sha256State:
    """A fresh state on the best backend available here."""
    return Sha256State()
