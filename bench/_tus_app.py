"""ASGI app serving tuspyserver's tus router, for the benchmark peer (``tus_peer.py``).

Served by uvicorn in a subprocess (``python -m uvicorn --factory --app-dir bench
_tus_app:app_from_env ...``), so the uvicorn process is the process that serves and is measured.
Importing this module has no side effect. ``app_from_env`` reads:

``BENCH_TUS_FILES_DIR``  (required) directory where tuspyserver stores uploads:
                         ``<dir>/<upload id>`` holds the bytes, ``<dir>/<upload id>.info`` a JSON
                         sidecar with offset, length and metadata.
``BENCH_TUS_BACKEND``    ``files-dir`` (default): tuspyserver's default code path, which appends
                         each piece of the request body to the file as it arrives;
                         ``local-storage``: its opt-in ``LocalFileStorage`` backend, which
                         gathers a whole PATCH body in memory, then writes and fsyncs it.

The tus endpoint is ``/files`` (creation: ``POST /files``; uploads: ``/files/<upload id>``).
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from tuspyserver import create_tus_router
from tuspyserver.storage.local import LocalFileStorage

FILES_DIR_ENV = "BENCH_TUS_FILES_DIR"
BACKEND_ENV = "BENCH_TUS_BACKEND"
BACKENDS = ("files-dir", "local-storage")
PREFIX = "files"


def create_app(files_dir: str, backend: str = "files-dir") -> FastAPI:
    """A FastAPI app with tuspyserver's router at ``/files``, storing under ``files_dir``."""
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, not {backend!r}")
    storage = LocalFileStorage(files_dir) if backend == "local-storage" else None
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(create_tus_router(prefix=PREFIX, files_dir=files_dir, storage=storage))
    return app


def app_from_env() -> FastAPI:
    """``create_app`` configured from the environment variables above (a uvicorn factory)."""
    return create_app(os.environ[FILES_DIR_ENV], os.environ.get(BACKEND_ENV, "files-dir"))
