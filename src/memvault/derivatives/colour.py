"""Convert a decoded image to sRGB using its embedded ICC profile, once it is display-sized.

Why at display size: a colour transform costs per pixel, and converting ~2 MP instead of the
source's 24 MP makes it a few milliseconds. Resampling before the transform happens in the
source's encoding either way (Pillow does not resample in linear light), so the order costs no
quality that the usual pipeline keeps.

Policy:

- an embedded profile whose colour space matches the pixels (RGB, CMYK, GRAY) is converted to
  sRGB with LittleCMS, relative colorimetric intent (what libvips and browsers use);
- no profile: 8-bit RGB and grey are taken as sRGB (the web's assumption); CMYK falls back to
  Pillow's plain inversion, which is what most viewers show for untagged CMYK;
- a profile LittleCMS cannot read, or one for another colour space, is ignored as if absent:
  a damaged profile should cost colour accuracy, not the whole image.

The result is always ``RGB`` or ``RGBA`` and carries no profile: untagged means sRGB.
"""

from __future__ import annotations

import io
import threading
from typing import Final

from PIL import Image, ImageCms

__all__ = ["to_srgb"]

_PROFILE_SPACE_FOR_MODE: Final = {"RGB": "RGB", "CMYK": "CMYK", "L": "GRAY"}

_srgb_lock = threading.Lock()
_srgb: ImageCms.ImageCmsProfile | None = None


def _srgb_profile() -> ImageCms.ImageCmsProfile:
    # Built on first use, not at import, and shared: profiles are read-only once made.
    global _srgb
    with _srgb_lock:
        if _srgb is None:
            _srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        return _srgb


def _read_profile(icc: bytes, mode: str) -> ImageCms.ImageCmsProfile | None:
    """The profile if LittleCMS reads it and it describes ``mode``'s colour space; else None."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except (OSError, ImageCms.PyCMSError, ValueError, TypeError):
        return None
    space = profile.profile.xcolor_space.strip()
    if space != _PROFILE_SPACE_FOR_MODE.get(mode):
        return None
    return profile


def _is_srgb(profile: ImageCms.ImageCmsProfile) -> bool:
    # Skipping a no-op transform saves a few ms on most camera and phone JPEGs.
    description = (profile.profile.profile_description or "").strip().lower()
    return description.startswith("srgb")


def to_srgb(image: Image.Image, icc: bytes | None) -> Image.Image:
    """``image`` (mode L, LA, RGB, RGBA or CMYK) in sRGB as ``RGB`` or ``RGBA``, no profile."""
    alpha: Image.Image | None = None
    colour = image
    if image.mode in ("RGBA", "LA"):
        alpha = image.getchannel("A")
        colour = image.convert(image.mode[:-1])

    profile = _read_profile(icc, colour.mode) if icc else None
    converted: Image.Image | None = None
    if profile is not None and not (colour.mode == "RGB" and _is_srgb(profile)):
        try:
            converted = ImageCms.profileToProfile(
                colour,
                profile,
                _srgb_profile(),
                renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
                outputMode="RGB",
            )
        except ImageCms.PyCMSError:
            converted = None  # a profile LittleCMS loads but cannot build a transform from
    if converted is None:
        converted = colour if colour.mode == "RGB" else colour.convert("RGB")

    if alpha is not None:
        converted.putalpha(alpha)
    converted.info = {}
    return converted
