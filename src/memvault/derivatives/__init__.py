"""Derivatives: display, thumb and placeholder images (plus a ThumbHash) from one original.

Used by the server's derivative jobs and by the SDK's lane B, so it is synchronous, CPU-bound,
thread-safe and imports nothing from the server (no FastAPI, no SQLAlchemy): the SDK can run
it in a worker process. It only reads originals.

    >>> from memvault.derivatives import make_derivatives, Unsupported
    >>> try:                                               # doctest: +SKIP
    ...     result = make_derivatives("photo.heic")
    ... except Unsupported as exc:
    ...     print(exc.code, exc.reason)                    # e.g. not_an_image, "... a PDF ..."

Modules: ``pipeline`` (``make_derivatives``), ``decode`` (safe open, pixel limit, one decode at
display size, orientation), ``colour`` (ICC → sRGB), ``thumbhash`` (the placeholder hash),
``sniff`` (allowed formats, naming non-images), ``model`` (the values below).

What the module guarantees per call, and what it leaves to the caller:

- Nothing is decoded before the header's width x height is checked against ``max_pixels``
  (default 100 MP). Peak memory is then bounded by the decoded image: for JPEG, the DCT-scaled
  size (≈ 4 x display pixels x 3 bytes, ~20 MB for any large photo); for other formats the full
  image (≤ ``max_pixels`` x 4 bytes, 400 MB at the default limit) plus display-sized copies.
- Time is proportional to the pixels decoded, so also bounded by ``max_pixels``; but a
  pathological file (e.g. a progressive JPEG with thousands of scans) can still be slow, and C
  decoders cannot be interrupted from Python. Hard wall-clock and memory limits belong to the
  process that runs this (the server's job runner, the SDK's worker process).
- Bad input raises ``Unsupported`` with a reason and a ``code``, never another exception type
  (except ``OSError`` for a path that cannot be read, and ``MemoryError`` if the caller's
  process limits are below the bound above).
"""

from memvault.derivatives.model import (
    Derivative,
    DerivativeOptions,
    DerivativeSet,
    DisplayFormat,
    Unsupported,
    UnsupportedCode,
)
from memvault.derivatives.pipeline import make_derivatives
from memvault.derivatives.sniff import ALLOWED_FORMATS

__all__ = [
    "ALLOWED_FORMATS",
    "Derivative",
    "DerivativeOptions",
    "DerivativeSet",
    "DisplayFormat",
    "Unsupported",
    "UnsupportedCode",
    "make_derivatives",
]
