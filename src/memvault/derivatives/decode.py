"""Open an untrusted image, refuse it early if it is not one we handle, and decode it once at
display size, upright and in sRGB.

The order is what makes it safe and fast:

1. Pillow identifies the format from the header, trying only ``ALLOWED_FORMATS``.
2. The declared width x height is checked against ``max_pixels`` before a pixel is decoded, so
   a 1 KB file claiming 50000x50000 costs a header read and nothing else.
3. JPEGs are decoded with ``draft``: libjpeg scales by 1/2, 1/4 or 1/8 in the DCT, to the
   smallest size still at least the display size. A 24 MP photo decodes as 6 MP.
4. One resize (with Pillow's ``reducing_gap``, a fast integer ``reduce`` first when the factor
   is large) to the display size; thumb and placeholder are later made from that image.
5. Colour conversion to sRGB and EXIF orientation are applied at display size, where they cost
   a few milliseconds.

Every failure of the decoders on bad input becomes ``Unsupported`` with a reason; the
originals are opened read-only and never written.
"""

from __future__ import annotations

import io
import os
import resource
import struct
import threading
from dataclasses import dataclass
from typing import IO, Final

from PIL import ExifTags, Image, ImageMath, UnidentifiedImageError

from memvault.derivatives.colour import to_srgb
from memvault.derivatives.model import Unsupported
from memvault.derivatives.sniff import ALLOWED_FORMATS, describe

__all__ = ["Decoded", "decode_display", "fit"]

#: What Pillow and its plugins raise on malformed input. Deliberately not ``Exception``: an
#: ``AttributeError`` or ``AssertionError`` here is our bug and must surface as one.
_DECODE_ERRORS: Final = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    RuntimeError,
)

#: The big display step from a draft-decoded JPEG is usually a factor below 2, where Hamming
#: (a windowed, antialiased 1-lobe filter) costs 56 ms on 6 MP here against Lanczos's 125 ms
#: and looks as sharp at display size. See docs/decisions.md, "Derivatives".
DISPLAY_FILTER: Final = Image.Resampling.HAMMING

#: Transpose operations for EXIF orientations 2..8 (1 and out-of-range values: none).
_TRANSPOSE: Final = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}

_heif_lock = threading.Lock()
_heif_registered = False


def _register_heif() -> None:
    """Teach Pillow HEIC/HEIF, once, on first use rather than at import."""
    global _heif_registered
    with _heif_lock:
        if not _heif_registered:
            from pillow_heif import register_heif_opener

            # Thumbnails and depth maps are never used: do not parse them.
            register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
            _heif_registered = True


def _openers() -> list[str]:
    """The allowed formats Pillow can open here (MPO is opened by the JPEG plugin; AVIF only
    where Pillow was built with libavif)."""
    _register_heif()
    Image.init()
    return [name for name in ALLOWED_FORMATS if name in Image.OPEN]


@dataclass(frozen=True)
class Decoded:
    """The display-sized, upright sRGB image (mode RGB or RGBA) and facts about its source."""

    image: Image.Image
    source_width: int
    source_height: int
    source_format: str


def fit(width: int, height: int, box: tuple[int, int]) -> tuple[int, int]:
    """``(width, height)`` scaled to fit inside ``box``, aspect kept, never enlarged, ≥ 1 px."""
    scale = min(1.0, box[0] / width, box[1] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _refuse_unidentified(fp: IO[bytes], exc: Exception) -> Unsupported:
    fp.seek(0)
    head = fp.read(SNIFF_BYTES)
    if not head:
        return Unsupported("the file is empty", "corrupt")
    refusal = not_an_image(head)
    if refusal is not None:
        return refusal
    allowed = ", ".join(ALLOWED_FORMATS)
    return Unsupported(f"not an image format we decode (we decode {allowed})", "unknown_format")


SNIFF_BYTES: Final = 32


def not_an_image(head: bytes) -> Unsupported | None:
    """The refusal for a file whose first ``SNIFF_BYTES`` say it is a known non-image (a
    video, a PDF, an archive), before anything is read or decoded; None if they do not."""
    what = describe(head)
    if what is None:
        return None
    return Unsupported(f"not an image: the file is {what}", "not_an_image")


def _orientation(image: Image.Image) -> int:
    """EXIF orientation 1..8; 1 when absent, invalid or unreadable.

    Call only once the image is loaded: for PNG, ``getexif`` otherwise decodes the whole image
    itself (an eXIf chunk may follow the pixels), and a decoding error would be swallowed here.
    """
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS:
        return 1  # broken EXIF costs the rotation, not the image
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _header_orientation(image: Image.Image) -> int:
    """The orientation stated in EXIF read with the header (JPEG's APP1), without decoding."""
    raw = image.info.get("exif")
    if not isinstance(raw, bytes):
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
    except _DECODE_ERRORS:
        return 1
    value = exif.get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _stored_target(
    size: tuple[int, int], orientation: int, box: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(upright source size, display size in the stored, pre-rotation orientation)."""
    swaps = orientation >= 5
    upright = (size[1], size[0]) if swaps else size
    target_w, target_h = fit(*upright, box)
    return upright, ((target_h, target_w) if swaps else (target_w, target_h))


def _to_working_mode(image: Image.Image) -> Image.Image:
    """One of L, LA, RGB, RGBA, CMYK: the modes ``resize`` and ``to_srgb`` handle."""
    mode = image.mode
    keyed = "transparency" in image.info  # a colour key (PNG tRNS): those pixels are clear
    if mode in ("L", "RGB") and keyed:
        return image.convert("LA" if mode == "L" else "RGBA")
    if mode in ("L", "LA", "RGB", "RGBA", "CMYK"):
        return image
    if mode == "P" or mode == "PA":
        return image.convert("RGBA" if mode == "PA" or keyed else "RGB")
    if mode == "1":
        return image.convert("L")
    if mode.startswith("I;16"):
        # convert("L") would clip 16-bit values at 255; scale the range down instead.
        wide = image.convert("I")
        grey = wide.point(lambda v: v * (1 / 257)).convert("L")
        key = image.info.get("transparency")
        if not isinstance(key, int):
            return grey
        # The key is a 16-bit value: the mask comes from the values before scaling.
        clear = ImageMath.lambda_eval(lambda a: (a["wide"] != key) * 255, wide=wide)
        grey.putalpha(clear.convert("L"))
        return grey
    if mode in ("I", "F"):
        # 32-bit integer or float grey has no fixed range: stretch what is there to 0..255.
        low, high = image.getextrema()
        if not isinstance(low, int | float) or not isinstance(high, int | float):
            raise Unsupported(f"pixel mode {mode!r} with several bands", "unknown_format")
        lo, span = float(low), float(high) - float(low) or 1.0
        return image.point(lambda v: (v - lo) * (255 / span)).convert("L")
    if mode == "La":
        return image.convert("LA")
    if mode in ("RGBa", "RGBX", "YCbCr", "LAB", "HSV"):
        return image.convert("RGBA" if mode == "RGBa" else "RGB")
    raise Unsupported(f"pixel mode {mode!r} is not supported", "unknown_format")


_OUT_OF_MEMORY: Final = ("out of memory", "pixel allocation failed", "cannot allocate memory")
"""How the AVIF and HEIF decoders say they could not get memory (an ``OSError`` or
``ValueError``, where Pillow's own decoders raise ``MemoryError``)."""
_WEBP_FAILED: Final = "could not create decoder object"
"""WebP's one message for a file it cannot take, out of memory and truncated alike."""


def _corrupt(what: str, exc: BaseException, fp: IO[bytes]) -> Exception:
    """``Unsupported`` (corrupt, for good), unless the decoder ran out of memory: then a
    ``MemoryError``, which the job retries and then reports as failed, never as corrupt.

    WebP's message is the same for both: a file shorter than its container says is corrupt;
    a whole one is corrupt where the process has no memory limit, and either where it has
    one (the job's decoder processes), which the error then says."""
    text = str(exc).lower()
    if any(sign in text for sign in _OUT_OF_MEMORY):
        return MemoryError(f"the decoder ran out of memory ({type(exc).__name__}: {exc})")
    if _WEBP_FAILED in text and _whole_riff(fp) and _memory_limited():
        return MemoryError(f"the WebP decoder could not start: the file is damaged, or the "
                           f"decoder ran out of memory ({exc})")
    return Unsupported(f"{what}: {exc}", "corrupt")


def _memory_limited() -> bool:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return soft != resource.RLIM_INFINITY


def _whole_riff(fp: IO[bytes]) -> bool:
    """Whether ``fp`` holds as many bytes as its RIFF header (WebP's container) declares."""
    try:
        fp.seek(0)
        head = fp.read(12)
        end = fp.seek(0, os.SEEK_END)
    except (OSError, ValueError):
        return False
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return False
    declared: int = struct.unpack("<I", head[4:8])[0]
    return end >= 8 + declared


def _drop_opaque_alpha(image: Image.Image) -> Image.Image:
    # PNG screenshots often carry an alpha channel that is 255 everywhere; without it the
    # display can be a JPEG.
    if image.mode == "RGBA" and image.getchannel("A").getextrema() == (255, 255):
        return image.convert("RGB")
    return image


def _decode(fp: IO[bytes], box: tuple[int, int], max_pixels: int) -> Decoded:
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        # Pillow refuses past 2 x its own limit (~179 MP) before our check runs: an operator
        # who raised max_pixels must get what they asked for. Ours stays the lower bound.
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        image = Image.open(fp, formats=_openers())
    except Image.DecompressionBombError as exc:
        # Pillow's own header check (at 2 x Image.MAX_IMAGE_PIXELS) fired before ours could.
        raise Unsupported(f"too many pixels: {exc}", "too_many_pixels") from exc
    except UnidentifiedImageError as exc:
        raise _refuse_unidentified(fp, exc) from exc
    except _DECODE_ERRORS as exc:
        raise _corrupt("unreadable image header", exc, fp) from exc

    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise Unsupported(f"the header declares a {width}x{height} image", "corrupt")
        if width * height > max_pixels:
            raise Unsupported(
                f"{width}x{height} is {width * height:,} pixels, over the limit of "
                f"{max_pixels:,}; nothing was decoded",
                "too_many_pixels",
            )
        source_format = image.format or "unknown"
        try:
            # JPEG only: libjpeg decodes at 1/2, 1/4 or 1/8 scale, still >= the display size.
            _, guess = _stored_target((width, height), _header_orientation(image), box)
            image.draft(image.mode, guess)
            image.load()
            orientation = _orientation(image)  # complete now, e.g. a PNG eXIf after the pixels
            upright, stored_target = _stored_target((width, height), orientation, box)
            icc = image.info.get("icc_profile")
            working = _to_working_mode(image)
            if working.size != stored_target:
                working = working.resize(stored_target, DISPLAY_FILTER, reducing_gap=2.0)
            display = to_srgb(working, icc if isinstance(icc, bytes) else None)
        except Unsupported:
            raise
        except Image.DecompressionBombError as exc:
            raise Unsupported(f"too many pixels: {exc}", "too_many_pixels") from exc
        except _DECODE_ERRORS as exc:
            raise _corrupt(f"corrupt or truncated {source_format}", exc, fp) from exc

    for op in _TRANSPOSE.get(orientation, ()):
        display = display.transpose(op)
    display = _drop_opaque_alpha(display)
    display.info = {}
    return Decoded(display, upright[0], upright[1], source_format)


def decode_display(
    source: str | os.PathLike[str] | bytes, box: tuple[int, int], max_pixels: int
) -> Decoded:
    """Decode ``source`` once, to fit ``box``: upright, sRGB, no metadata. Read-only.

    Raises ``Unsupported`` for anything that is not a decodable image of an allowed format
    within ``max_pixels``; ``OSError`` (e.g. ``FileNotFoundError``) when a path cannot be read.
    """
    if isinstance(source, bytes):
        return _decode(io.BytesIO(source), box, max_pixels)
    with open(source, "rb") as fp:
        return _decode(fp, box, max_pixels)
