"""Test images made on the fly: no downloads, no binary fixtures in the repository.

Includes two things Pillow cannot make for us: a Display P3 ICC profile (LittleCMS only
creates sRGB, Lab and XYZ profiles) and a PNG whose header lies about its size.
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

# Display P3 colorants, adapted to the D50 profile connection space (the values Apple's
# "Display P3" profile carries), and the sRGB transfer curve as an ICC parametric curve.
_P3_COLORANTS = {
    b"rXYZ": (0.515121, 0.241196, -0.001053),
    b"gXYZ": (0.291977, 0.692245, 0.041885),
    b"bXYZ": (0.157104, 0.066574, 0.784073),
}
_D50 = (0.9642, 1.0, 0.8249)
_SRGB_CURVE = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)


def _s15f16(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz_tag(xyz: tuple[float, float, float]) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(_s15f16(v) for v in xyz)


def _desc_tag(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    return (
        b"desc\0\0\0\0"
        + struct.pack(">I", len(ascii_text))
        + ascii_text
        + struct.pack(">II", 0, 0)  # no Unicode description
        + struct.pack(">HB", 0, 0)
        + b"\0" * 67  # no ScriptCode description
    )


def _para_tag() -> bytes:
    return b"para\0\0\0\0" + struct.pack(">HH", 3, 0) + b"".join(_s15f16(v) for v in _SRGB_CURVE)


def display_p3_profile() -> bytes:
    """A minimal ICC v2 matrix/TRC profile for Display P3 (what iPhones embed)."""
    curve = _para_tag()
    tags = [
        (b"desc", _desc_tag("Display P3 (memvault test)")),
        (b"wtpt", _xyz_tag(_D50)),
        *((sig, _xyz_tag(xyz)) for sig, xyz in _P3_COLORANTS.items()),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
        (b"cprt", b"text\0\0\0\0public domain\0"),
    ]
    table_size = 4 + 12 * len(tags)
    offset = 128 + table_size
    entries, data = [], b""
    for sig, body in tags:
        padded = body + b"\0" * (-len(body) % 4)
        entries.append(struct.pack(">4sII", sig, offset + len(data), len(body)))
        data += padded
    size = offset + len(data)
    header = (
        struct.pack(">I", size)
        + b"\0\0\0\0"
        + bytes([2, 0x10, 0, 0])
        + b"mntrRGB XYZ "
        + struct.pack(">6H", 2024, 1, 1, 0, 0, 0)
        + b"acsp"
        + b"\0" * 24  # platform, flags, manufacturer, model, attributes
        + struct.pack(">I", 0)  # perceptual intent
        + b"".join(_s15f16(v) for v in _D50)
        + b"\0" * 48  # creator, profile id, reserved
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + b"".join(entries) + data


def _srgb_decode(v: float) -> float:
    return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4


def _srgb_encode(v: float) -> float:
    v = min(1.0, max(0.0, v))
    return v * 12.92 if v <= 0.0031308 else 1.055 * v ** (1 / 2.4) - 0.055


# Linear Display P3 -> linear sRGB (both D65), from the two spaces' published primaries.
_P3_TO_SRGB = (
    (1.2249401, -0.2249404, 0.0),
    (-0.0420569, 1.0420571, 0.0),
    (-0.0196376, -0.0786361, 1.0982735),
)


def p3_to_srgb(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """What a correct conversion makes of an 8-bit Display P3 colour, computed without LCMS."""
    linear = [_srgb_decode(c / 255) for c in rgb]
    out = [sum(m * c for m, c in zip(row, linear, strict=True)) for row in _P3_TO_SRGB]
    r, g, b = (round(_srgb_encode(c) * 255) for c in out)
    return r, g, b


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def lying_png(width: int, height: int) -> bytes:
    """A valid-looking ~60-byte RGB PNG whose header claims ``width`` x ``height``."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def quadrants(size: tuple[int, int], marked: tuple[int, int, int]) -> Image.Image:
    """Blue image whose top-left quadrant is ``marked``: shows where a corner ended up."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste(marked, (0, 0, size[0] // 2, size[1] // 2))
    return image
