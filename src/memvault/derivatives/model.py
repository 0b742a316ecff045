"""The values ``make_derivatives`` takes and returns, and its one failure type.

Plain frozen dataclasses with no behaviour beyond validation, so the SDK can pickle them across
a process boundary and the server can store them without importing any imaging library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

DISPLAY: Final = "display"
THUMB: Final = "thumb"
PLACEHOLDER: Final = "placeholder"

DisplayFormat = Literal["JPEG", "WEBP"]

UnsupportedCode = Literal["unknown_format", "not_an_image", "too_many_pixels", "corrupt"]
"""Why no derivatives could be made:

- ``unknown_format``: the bytes are no format we decode (random bytes, an unlisted image type);
- ``not_an_image``: a recognised non-image (PDF, video, archive): expected, not an error;
- ``too_many_pixels``: the header declares more pixels than ``DerivativeOptions.max_pixels``
  (a decompression bomb, or simply too large); nothing was decoded;
- ``corrupt``: the header looked valid but decoding failed (truncated, damaged, lying file).
"""


class Unsupported(Exception):
    """The source is not an image we can derive from; ``reason`` says why in plain words.

    ``code`` is a stable short name for the kind of refusal (see ``UnsupportedCode``), so a
    caller can store ``unsupported`` for a PDF but ``failed`` for a corrupt JPEG if it wants to.
    The original exception, if any, is chained as ``__cause__``.
    """

    def __init__(self, reason: str, code: UnsupportedCode = "unknown_format") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code: UnsupportedCode = code

    def __reduce__(self) -> tuple[type[Unsupported], tuple[str, UnsupportedCode]]:
        # Keeps both fields when the SDK sends the error back from a worker process.
        return (type(self), (self.reason, self.code))


@dataclass(frozen=True)
class Derivative:
    """One encoded output image. ``role`` is ``display``, ``thumb`` or ``placeholder``."""

    role: str
    data: bytes = field(repr=False)
    content_type: str
    width: int
    height: int


@dataclass(frozen=True)
class DerivativeSet:
    """The three derivatives of one source image, plus its ThumbHash.

    ``thumbhash`` is the standard base64 (with padding) of the ThumbHash bytes, the form the
    reference JavaScript decoder takes after ``atob``. ``source_width``/``source_height`` are the
    original's dimensions after EXIF orientation, ``source_format`` Pillow's format name.
    """

    display: Derivative
    thumb: Derivative
    placeholder: Derivative
    thumbhash: str
    source_width: int = 0
    source_height: int = 0
    source_format: str = ""


@dataclass(frozen=True)
class DerivativeOptions:
    """Sizes, formats and limits. The defaults are the product's; the server may configure them.

    Boxes are ``(width, height)`` maxima: an output fits inside its box, keeps the aspect ratio
    and is never larger than the source (no upscaling). ``max_pixels`` is checked against the
    header's declared width x height before anything is decoded.
    """

    display_box: tuple[int, int] = (1920, 1080)
    display_format: DisplayFormat = "JPEG"
    display_quality: int = 80
    thumb_box: tuple[int, int] = (300, 300)
    thumb_quality: int = 80
    placeholder_size: int = 32
    placeholder_quality: int = 50
    max_pixels: int = 100_000_000

    def __post_init__(self) -> None:
        for name in ("display_box", "thumb_box"):
            box = getattr(self, name)
            if len(box) != 2 or min(box) < 1:
                raise ValueError(f"{name} must be two positive integers, got {box!r}")
        if self.display_format not in ("JPEG", "WEBP"):
            raise ValueError(f"display_format must be JPEG or WEBP, got {self.display_format!r}")
        for name in ("display_quality", "thumb_quality", "placeholder_quality"):
            quality = getattr(self, name)
            if not 1 <= quality <= 100:
                raise ValueError(f"{name} must be within 1..100, got {quality}")
        if not 1 <= self.placeholder_size <= 100:
            # ThumbHash is computed from the placeholder; the format caps its input at 100 px.
            raise ValueError(f"placeholder_size must be within 1..100, got {self.placeholder_size}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
