"""Our ThumbHash encoder against hashes from an independent implementation.

The expected values were computed once with PyPI ``thumbhash-python`` 1.0.1
(``thumbhash.encode.rgba_to_thumbhash``) on the same pseudo-random pixels, so the hashes our
clients store decode the same in any reference decoder.
"""

from __future__ import annotations

import random

import pytest

from memvault.derivatives.thumbhash import approximate_aspect_ratio, encode

_EXPECTED = {
    (32, 21, False): "df07020d823898ff789755976b7c65614b5037f23b",
    (21, 32, False): "df07020d026756bc7c62e8fbc8a5b71772700e3051",
    (32, 32, True): "1f08820500077b6b78bc6085e945209fbff07c046737587788",
    (17, 5, True): "1ee885098208677778907af343e84a05d8fbdb8a8b65e9",
    (1, 1, False): "1c0d39573f08f708888788708f7088f80888808008f7870f",
}


def _pixels() -> dict[tuple[int, int, bool], bytes]:
    # One generator across the cases, in this order, as when the references were made.
    rng = random.Random(7)
    out = {}
    for w, h, alpha in _EXPECTED:
        px: list[int] = []
        for _ in range(w * h):
            px += [rng.randrange(256), rng.randrange(256), rng.randrange(256)]
            px.append(rng.randrange(256) if alpha else 255)
        out[(w, h, alpha)] = bytes(px)
    return out


def test_matches_an_independent_implementation() -> None:
    for case, rgba in _pixels().items():
        assert encode(case[0], case[1], rgba).hex() == _EXPECTED[case], case


def test_aspect_ratio_orientation() -> None:
    pixels = _pixels()
    assert approximate_aspect_ratio(encode(32, 21, pixels[(32, 21, False)])) > 1
    assert approximate_aspect_ratio(encode(21, 32, pixels[(21, 32, False)])) < 1


@pytest.mark.parametrize(("w", "h", "n"), [(0, 5, 0), (101, 5, 101 * 5 * 4), (5, 5, 7)])
def test_rejects_bad_input(w: int, h: int, n: int) -> None:
    with pytest.raises(ValueError, match=r"ThumbHash|RGBA"):
        encode(w, h, bytes(n))
