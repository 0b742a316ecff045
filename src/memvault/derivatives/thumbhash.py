"""ThumbHash encoding (Evan Wallace's placeholder format), written from its published description.

The PyPI ports (``thumbhash``, ``thumbhash-python``, ``thumbhash-py``, all last released in 2023,
and a few young Rust bindings) are small single-author packages; the algorithm is ~100 lines, so
we keep our own and test it rather than take on an unmaintained dependency.

The format in brief: the image (≤ 100x100, RGBA, not premultiplied) is composited over its
alpha-weighted average colour and converted to L (luminance), P (yellow-blue), Q (red-green)
and A. Each channel is reduced to the low-frequency triangle of its DCT (L: up to 7 coefficients
along the long side, 5 when there is alpha; P and Q: 3x3; A: 5x5). A 5-byte header (6 with
alpha) holds the DC terms, the AC scales, the L coefficient count along the short side and the
orientation, so the aspect ratio can be read back; the AC terms follow as 4-bit nibbles, low
nibble first. The result is ~20-25 bytes for any image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["approximate_aspect_ratio", "average_rgba", "encode"]


def _round(x: float) -> int:
    # The reference implementations round half away from zero (all inputs here are >= 0);
    # Python's round() would round half to even and change a few hashes.
    return math.floor(x + 0.5)


def _dct_triangle(
    rows: Sequence[Sequence[float]], w: int, h: int, nx: int, ny: int
) -> tuple[float, list[float], float]:
    """DC term, normalised AC terms and AC scale of one channel's low-frequency triangle.

    Coefficient (cx, cy) is kept while ``cx * ny < nx * (ny - cy)``. The 2-D sum is separable:
    first each row-frequency ``cy`` is folded over the rows, then each ``cx`` over the columns,
    which keeps pure Python fast enough (~1 ms for 32x32).
    """
    fx = [[math.cos(math.pi / w * cx * (x + 0.5)) for x in range(w)] for cx in range(nx)]
    dc = 0.0
    ac: list[float] = []
    scale = 0.0
    for cy in range(ny):
        fy = [math.cos(math.pi / h * cy * (y + 0.5)) for y in range(h)]
        folded = [0.0] * w
        for row, weight in zip(rows, fy, strict=True):
            folded = [acc + weight * value for acc, value in zip(folded, row, strict=True)]
        cx = 0
        while cx * ny < nx * (ny - cy):
            f = sum(a * b for a, b in zip(folded, fx[cx], strict=True)) / (w * h)
            if cx == 0 and cy == 0:
                dc = f
            else:
                ac.append(f)
                scale = max(scale, abs(f))
            cx += 1
    if scale > 0:
        ac = [0.5 + 0.5 / scale * f for f in ac]
    return dc, ac, scale


def encode(width: int, height: int, rgba: bytes) -> bytes:
    """ThumbHash of an RGBA image of at most 100x100 pixels (row-major, 4 bytes a pixel)."""
    if not (0 < width <= 100 and 0 < height <= 100):
        raise ValueError(f"ThumbHash input must be 1..100 px a side, got {width}x{height}")
    if len(rgba) != width * height * 4:
        raise ValueError(f"expected {width * height * 4} bytes of RGBA, got {len(rgba)}")

    # Per-channel float lists, composited over the alpha-weighted average colour so that
    # transparent pixels do not pull the hash towards black. Slices keep the loops in C.
    red, green, blue = (
        [v / 255 for v in rgba[0::4]],
        [v / 255 for v in rgba[1::4]],
        [v / 255 for v in rgba[2::4]],
    )
    alpha = [v / 255 for v in rgba[3::4]]
    total_alpha = sum(alpha)
    if total_alpha > 0:
        avg_r = sum(a * v for a, v in zip(alpha, red, strict=True)) / total_alpha
        avg_g = sum(a * v for a, v in zip(alpha, green, strict=True)) / total_alpha
        avg_b = sum(a * v for a, v in zip(alpha, blue, strict=True)) / total_alpha
    else:
        avg_r = avg_g = avg_b = 0.0

    has_alpha = total_alpha < width * height
    if has_alpha:
        red = [avg_r * (1 - a) + a * v for a, v in zip(alpha, red, strict=True)]
        green = [avg_g * (1 - a) + a * v for a, v in zip(alpha, green, strict=True)]
        blue = [avg_b * (1 - a) + a * v for a, v in zip(alpha, blue, strict=True)]
    l_limit = 5 if has_alpha else 7  # fewer luminance terms leave room for the alpha channel
    long_side = max(width, height)
    lx = max(1, _round(l_limit * width / long_side))
    ly = max(1, _round(l_limit * height / long_side))

    rgb = list(zip(red, green, blue, strict=True))
    lum = [(r + g + b) / 3 for r, g, b in rgb]
    yellow_blue = [(r + g) / 2 - b for r, g, b in rgb]
    red_green = [r - g for r, g, _ in rgb]

    def rows(channel: list[float]) -> list[list[float]]:
        return [channel[y * width : (y + 1) * width] for y in range(height)]

    l_rows, p_rows, q_rows, a_rows = rows(lum), rows(yellow_blue), rows(red_green), rows(alpha)

    l_dc, l_ac, l_scale = _dct_triangle(l_rows, width, height, max(lx, 3), max(ly, 3))
    p_dc, p_ac, p_scale = _dct_triangle(p_rows, width, height, 3, 3)
    q_dc, q_ac, q_scale = _dct_triangle(q_rows, width, height, 3, 3)
    if has_alpha:
        a_dc, a_ac, a_scale = _dct_triangle(a_rows, width, height, 5, 5)

    is_landscape = width > height
    header24 = (
        _round(63 * l_dc)
        | (_round(31.5 + 31.5 * p_dc) << 6)
        | (_round(31.5 + 31.5 * q_dc) << 12)
        | (_round(31 * l_scale) << 18)
        | (int(has_alpha) << 23)
    )
    header16 = (
        (ly if is_landscape else lx)
        | (_round(63 * p_scale) << 3)
        | (_round(63 * q_scale) << 9)
        | (int(is_landscape) << 15)
    )
    out = bytearray(
        [header24 & 255, (header24 >> 8) & 255, header24 >> 16, header16 & 255, header16 >> 8]
    )
    nibbles = [*l_ac, *p_ac, *q_ac]
    if has_alpha:
        out.append(_round(15 * a_dc) | (_round(15 * a_scale) << 4))
        nibbles += a_ac
    for i in range(0, len(nibbles), 2):
        low = _round(15 * nibbles[i])
        high = _round(15 * nibbles[i + 1]) if i + 1 < len(nibbles) else 0
        out.append(low | (high << 4))
    return bytes(out)


def approximate_aspect_ratio(thumbhash: bytes) -> float:
    """Width / height of the hashed image, as well as the hash records it (within ~1/7)."""
    if len(thumbhash) < 5:
        raise ValueError("a ThumbHash has at least 5 bytes")
    has_alpha = bool(thumbhash[2] & 0x80)
    l_max = 5 if has_alpha else 7
    l_min = thumbhash[3] & 7
    is_landscape = bool(thumbhash[4] & 0x80)
    lx, ly = (l_max, l_min) if is_landscape else (l_min, l_max)
    return lx / ly


def average_rgba(thumbhash: bytes) -> tuple[float, float, float, float]:
    """The hashed image's average colour, each channel within 0..1 (RGB not premultiplied)."""
    if len(thumbhash) < 5:
        raise ValueError("a ThumbHash has at least 5 bytes")
    header = thumbhash[0] | (thumbhash[1] << 8) | (thumbhash[2] << 16)
    lum = (header & 63) / 63
    p = ((header >> 6) & 63) / 31.5 - 1
    q = ((header >> 12) & 63) / 31.5 - 1
    alpha = (thumbhash[5] & 15) / 15 if header >> 23 else 1.0
    b = lum - 2 / 3 * p
    r = (3 * lum - b + q) / 2
    g = r - q

    def clamp(v: float) -> float:
        return min(1.0, max(0.0, v))

    return clamp(r), clamp(g), clamp(b), alpha
