"""make_derivatives on a corpus generated here: sizes, orientation, colour, metadata, formats,
and every kind of bad input ending as ``Unsupported`` with a reason."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import pickle
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pillow_heif
import pytest
from PIL import Image, ImageOps

from memvault.derivatives import (
    Derivative,
    DerivativeOptions,
    DerivativeSet,
    Unsupported,
    make_derivatives,
)
from memvault.derivatives.thumbhash import approximate_aspect_ratio, average_rgba
from tests.image_corpus import display_p3_profile, encode, lying_png, p3_to_srgb, quadrants

SMALL = DerivativeOptions(display_box=(160, 120), thumb_box=(64, 64), placeholder_size=32)
"""Small boxes keep the tests fast; the code paths are the same as with the defaults."""

RED = (230, 20, 20)


def opened(derivative: Derivative) -> Image.Image:
    image = Image.open(io.BytesIO(derivative.data))
    image.load()
    return image


def assert_clean(result: DerivativeSet) -> None:
    """Every output decodes, matches its declared size and type, and carries no metadata."""
    for derivative in (result.display, result.thumb, result.placeholder):
        image = opened(derivative)
        assert image.size == (derivative.width, derivative.height)
        assert Image.MIME[image.format or ""] == derivative.content_type
        for key in ("exif", "icc_profile", "xmp", "XML:com.adobe.xmp"):
            assert key not in image.info, (derivative.role, key)
        assert not image.getexif()
        assert b"Exif\0\0" not in derivative.data


def near(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=False))


# --- sizes ---------------------------------------------------------------------------------


def test_large_landscape_jpeg_with_default_options() -> None:
    source = encode(Image.new("RGB", (2400, 1600), (90, 140, 200)), "JPEG", quality=85)
    result = make_derivatives(source)
    assert (result.display.width, result.display.height) == (1620, 1080)
    assert result.display.content_type == "image/jpeg"
    assert (result.thumb.width, result.thumb.height) == (300, 200)
    assert result.thumb.content_type == "image/webp"
    assert (result.placeholder.width, result.placeholder.height) == (32, 21)
    assert len(result.placeholder.data) < 500
    assert (result.source_width, result.source_height, result.source_format) == (
        2400,
        1600,
        "JPEG",
    )
    assert_clean(result)


@pytest.mark.parametrize(
    ("size", "display", "thumb", "placeholder"),
    [
        ((800, 600), (160, 120), (64, 48), (32, 24)),
        ((600, 900), (80, 120), (43, 64), (21, 32)),
        ((100, 80), (100, 80), (64, 51), (32, 26)),  # smaller than the display box
        ((40, 20), (40, 20), (40, 20), (32, 16)),  # smaller than the thumb box
        ((20, 10), (20, 10), (20, 10), (20, 10)),  # smaller than everything: never upscaled
        ((4000, 10), (160, 1), (64, 1), (32, 1)),  # extreme panorama: at least 1 px
    ],
)
def test_outputs_fit_their_boxes_and_are_never_upscaled(
    size: tuple[int, int],
    display: tuple[int, int],
    thumb: tuple[int, int],
    placeholder: tuple[int, int],
) -> None:
    result = make_derivatives(encode(Image.new("RGB", size, RED), "PNG"), SMALL)
    assert (result.display.width, result.display.height) == display
    assert (result.thumb.width, result.thumb.height) == thumb
    assert (result.placeholder.width, result.placeholder.height) == placeholder
    assert_clean(result)


def test_thumbhash_decodes_to_the_aspect_ratio_and_colour() -> None:
    for size, ratio in (((600, 400), 1.5), ((400, 600), 1 / 1.5), ((500, 500), 1.0)):
        result = make_derivatives(encode(Image.new("RGB", size, RED), "PNG"), SMALL)
        hash_bytes = base64.b64decode(result.thumbhash, validate=True)
        assert len(hash_bytes) < 30
        # The hash stores the short side's coefficient count out of 7: ratio within ~1/7.
        assert approximate_aspect_ratio(hash_bytes) == pytest.approx(ratio, rel=0.15)
        r, g, b, a = average_rgba(hash_bytes)
        assert near((round(r * 255), round(g * 255), round(b * 255)), RED, 12)
        assert a == 1.0


def test_path_and_bytes_give_the_same_result_and_the_original_is_untouched(
    tmp_path: Path,
) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(quadrants((120, 80), RED), "JPEG", exif=exif.tobytes()))
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    os.chmod(path, 0o444)  # read-only: writing to it would raise

    from_path = make_derivatives(path, SMALL)
    from_str = make_derivatives(str(path), SMALL)
    from_bytes = make_derivatives(path.read_bytes(), SMALL)
    assert from_path == from_str == from_bytes
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_a_missing_path_is_an_os_error_not_unsupported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        make_derivatives(tmp_path / "nope.jpg")


# --- orientation ---------------------------------------------------------------------------

# How each EXIF orientation stores an upright image (the inverse of what a viewer applies).
_STORE = {
    1: [],
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_90],  # viewer turns it 90° clockwise back
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_270],
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_puts_the_marked_corner_top_left(orientation: int) -> None:
    upright = quadrants((120, 80), RED)
    stored = upright
    for op in _STORE[orientation]:
        stored = stored.transpose(op)
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "memvault-test-camera"
    source = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    # The fixture itself is right: Pillow's own exif_transpose restores the upright image.
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(source))).size == (120, 80)

    result = make_derivatives(source, SMALL)
    display = opened(result.display).convert("RGB")
    assert display.size == (120, 80)
    assert (result.source_width, result.source_height) == (120, 80)
    assert near(display.getpixel((10, 10)), RED, 40)  # top-left: the mark
    for corner in ((110, 10), (10, 70), (110, 70)):
        assert near(display.getpixel(corner), (0, 0, 255), 40), corner
    thumb = opened(result.thumb).convert("RGB")
    assert near(thumb.getpixel((3, 3)), RED, 40)
    assert_clean(result)


# --- colour --------------------------------------------------------------------------------


def test_display_p3_jpeg_is_converted_to_srgb() -> None:
    colour = (200, 100, 50)
    image = Image.new("RGB", (64, 48), colour)
    source = encode(image, "JPEG", quality=95, icc_profile=display_p3_profile())
    result = make_derivatives(source, SMALL)
    expected = p3_to_srgb(colour)  # (215, 93, 31): redder than the stored numbers
    for derivative in (result.display, result.thumb, result.placeholder):
        pixel = opened(derivative).convert("RGB").getpixel((5, 5))
        assert near(pixel, expected, 5), (derivative.role, pixel, expected)
    assert_clean(result)  # and no P3 (or any) profile remains


def test_untagged_rgb_is_kept_as_srgb() -> None:
    colour = (200, 100, 50)
    result = make_derivatives(encode(Image.new("RGB", (64, 48), colour), "PNG"), SMALL)
    assert near(opened(result.display).getpixel((5, 5)), colour, 3)


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    cmyk_red = (0, 255, 255, 0)  # no cyan, full magenta and yellow
    source = encode(Image.new("CMYK", (64, 48), cmyk_red), "JPEG", quality=95)
    assert Image.open(io.BytesIO(source)).mode == "CMYK"
    result = make_derivatives(source, SMALL)
    display = opened(result.display)
    assert display.mode == "RGB"
    assert near(display.getpixel((5, 5)), (255, 0, 0), 12)
    assert_clean(result)


def test_a_broken_icc_profile_costs_the_colour_not_the_image() -> None:
    colour = (200, 100, 50)
    source = encode(Image.new("RGB", (64, 48), colour), "JPEG", quality=95, icc_profile=b"junk")
    result = make_derivatives(source, SMALL)
    assert near(opened(result.display).getpixel((5, 5)), colour, 4)


# --- formats -------------------------------------------------------------------------------


def test_png_with_alpha_keeps_transparency_in_webp() -> None:
    image = Image.new("RGBA", (200, 100), (0, 0, 0, 0))
    image.paste((20, 200, 20, 255), (0, 0, 100, 100))
    result = make_derivatives(encode(image, "PNG"), SMALL)
    assert result.display.content_type == "image/webp"  # JPEG cannot hold alpha
    for derivative in (result.display, result.thumb, result.placeholder):
        out = opened(derivative)
        assert out.mode == "RGBA"
        assert out.getpixel((1, 1))[3] == 255
        assert out.getpixel((out.width - 2, 1))[3] == 0
    assert base64.b64decode(result.thumbhash)[2] & 0x80  # the hash records alpha
    assert_clean(result)


def test_png_with_an_opaque_alpha_channel_gets_a_jpeg_display() -> None:
    result = make_derivatives(encode(Image.new("RGBA", (200, 100), (*RED, 255)), "PNG"), SMALL)
    assert result.display.content_type == "image/jpeg"


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (80, 60), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    source = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(source)).n_frames == 3
    result = make_derivatives(source, SMALL)
    assert result.source_format == "GIF"
    assert near(opened(result.display).getpixel((40, 30)), (255, 0, 0), 10)
    assert_clean(result)


def test_sixteen_bit_grey_png_is_scaled_not_clipped() -> None:
    image = Image.new("I;16", (64, 48), 32768)  # mid grey at 16 bits
    source = encode(image, "PNG")
    assert Image.open(io.BytesIO(source)).mode.startswith("I;16")
    result = make_derivatives(source, SMALL)
    pixel = opened(result.display).convert("RGB").getpixel((5, 5))
    assert near(pixel, (128, 128, 128), 3), pixel


@pytest.mark.parametrize(
    ("fmt", "params", "source_format"),
    [
        ("WEBP", {"quality": 90}, "WEBP"),
        ("TIFF", {"compression": "tiff_lzw"}, "TIFF"),
        ("HEIF", {"quality": 90}, "HEIF"),
        ("AVIF", {"quality": 90}, "AVIF"),
        ("PNG", {}, "PNG"),
        ("GIF", {}, "GIF"),
        ("JPEG", {"quality": 95}, "JPEG"),
    ],
)
def test_each_supported_format(fmt: str, params: dict[str, object], source_format: str) -> None:
    if fmt == "HEIF":
        pillow_heif.register_heif_opener()
    if fmt == "AVIF" and "AVIF" not in Image.SAVE:
        pytest.skip("this Pillow has no AVIF support")
    source = encode(quadrants((96, 64), RED), fmt, **params)
    result = make_derivatives(source, SMALL)
    assert result.source_format == source_format
    display = opened(result.display).convert("RGB")
    assert display.size == (96, 64)
    assert near(display.getpixel((8, 8)), RED, 40)
    assert near(display.getpixel((88, 56)), (0, 0, 255), 40)
    assert_clean(result)


def test_gps_exif_is_stripped_from_every_output() -> None:
    exif = Image.Exif()
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (48.0, 51.0, 24.0)
    exif[0x010F] = "memvault-test-camera"
    source = encode(Image.new("RGB", (300, 200), RED), "JPEG", exif=exif.tobytes())
    assert Image.open(io.BytesIO(source)).getexif().get_ifd(0x8825)
    result = make_derivatives(source, SMALL)
    assert_clean(result)
    for derivative in (result.display, result.thumb, result.placeholder):
        assert b"memvault-test-camera" not in derivative.data


# --- bad input -----------------------------------------------------------------------------


def _refusal(source: bytes, options: DerivativeOptions = SMALL) -> Unsupported:
    with pytest.raises(Unsupported) as info:
        make_derivatives(source, options)
    assert info.value.reason
    return info.value


def test_bomb_is_refused_from_the_header() -> None:
    bomb = lying_png(50_000, 50_000)
    assert len(bomb) < 1024
    assert _refusal(bomb).code == "too_many_pixels"


def test_our_pixel_limit_applies_before_decoding() -> None:
    # 3000x3000 is far below Pillow's own bomb limit: only our check stops it.
    refusal = _refusal(lying_png(3000, 3000), DerivativeOptions(max_pixels=1_000_000))
    assert refusal.code == "too_many_pixels"
    assert "9,000,000" in refusal.reason
    assert refusal.__cause__ is None  # refused by us, not by a decoder


def test_bomb_does_not_allocate() -> None:
    """Under an address-space limit of 128 MiB above the interpreter's own, decoding either
    bomb (7.5 GB and 243 MB of pixels) would raise MemoryError; refusing them must not.

    The second stays under Pillow's own limit (89 MP): only our ``max_pixels`` stops it."""
    script = textwrap.dedent(
        """
        import resource, sys
        from memvault.derivatives import DerivativeOptions, Unsupported, make_derivatives
        from PIL import Image
        from tests.image_corpus import encode, lying_png
        make_derivatives(encode(Image.new("RGB", (64, 64)), "PNG"))  # load plugins first
        with open("/proc/self/status") as f:
            vm = next(int(l.split()[1]) for l in f if l.startswith("VmSize:")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + 128 * 2**20, resource.RLIM_INFINITY))
        for size, limit in (((50_000, 50_000), 100_000_000), ((9_000, 9_000), 50_000_000)):
            try:
                make_derivatives(lying_png(*size), DerivativeOptions(max_pixels=limit))
            except Unsupported as exc:
                print(exc.code)
        with open("/proc/self/status") as f:
            print(next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) // 1024)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=60,
    ).stdout.split()
    assert out[:2] == ["too_many_pixels", "too_many_pixels"]
    assert int(out[2]) < 200  # peak RSS in MiB: imports only, no pixel buffer


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF"])
def test_truncated_files_are_corrupt(fmt: str) -> None:
    image = Image.effect_noise((256, 256), 80).convert("RGB")
    whole = encode(image, fmt)
    refusal = _refusal(whole[: len(whole) // 2])
    assert refusal.code == "corrupt"


def test_garbage_after_a_valid_header_is_corrupt() -> None:
    whole = encode(Image.effect_noise((128, 128), 80).convert("RGB"), "PNG")
    damaged = whole[:100] + bytes(range(256)) * 8 + whole[100 + 2048 :]
    assert _refusal(damaged).code == "corrupt"


@pytest.mark.parametrize(
    ("source", "code", "words"),
    [
        (os.urandom(4096), "unknown_format", "not an image format"),
        (b"", "corrupt", "empty"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "not_an_image", "PDF"),
        (b"\0\0\0\x20ftypisom\0\0\x02\0isomiso2avc1mp41" + bytes(64), "not_an_image", "video"),
        (b"\0\0\0\x14ftypqt  \0\0\0\0qt  " + bytes(64), "not_an_image", "video"),
        (b"\x1a\x45\xdf\xa3" + bytes(64), "not_an_image", "video"),
        (b"PK\x03\x04" + bytes(64), "not_an_image", "ZIP"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "unknown_format", "not an image format"),
    ],
)
def test_non_images_are_unsupported_with_a_reason(source: bytes, code: str, words: str) -> None:
    refusal = _refusal(source)
    assert refusal.code == code
    assert words in refusal.reason


def test_formats_outside_the_allowed_list_are_refused() -> None:
    # Pillow decodes BMP and ICO, but we do not expose those parsers to uploads.
    for fmt in ("BMP", "ICO", "PPM"):
        refusal = _refusal(encode(Image.new("RGB", (32, 32), RED), fmt))
        assert refusal.code == "unknown_format", fmt


def test_pdf_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "holiday.jpg"
    path.write_bytes(b"%PDF-1.4\n" + bytes(200))
    with pytest.raises(Unsupported, match="PDF") as info:
        make_derivatives(path, SMALL)
    assert info.value.code == "not_an_image"


# --- API contract --------------------------------------------------------------------------


def test_unsupported_survives_pickling_for_worker_processes() -> None:
    error = Unsupported("a PDF", "not_an_image")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.code, str(copy)) == ("a PDF", "not_an_image", "a PDF")


def test_results_pickle_for_worker_processes() -> None:
    result = make_derivatives(encode(Image.new("RGB", (64, 48), RED), "PNG"), SMALL)
    assert pickle.loads(pickle.dumps(result)) == result


def test_thread_safe() -> None:
    sources = [
        encode(quadrants((300 + 20 * i, 200), (20 * i, 100, 50)), "JPEG", quality=90)
        for i in range(6)
    ]
    sequential = [make_derivatives(s, SMALL) for s in sources]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda s: make_derivatives(s, SMALL), sources * 2))
    assert parallel == sequential * 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"display_box": (0, 100)},
        {"thumb_box": (300,)},
        {"display_format": "PNG"},
        {"display_quality": 0},
        {"thumb_quality": 101},
        {"placeholder_size": 101},
        {"max_pixels": 0},
    ],
)
def test_options_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DerivativeOptions(**kwargs)  # type: ignore[arg-type]


def test_display_can_be_webp() -> None:
    options = DerivativeOptions(display_box=(160, 120), display_format="WEBP", display_quality=70)
    result = make_derivatives(encode(Image.new("RGB", (320, 240), RED), "PNG"), options)
    assert result.display.content_type == "image/webp"
    assert (result.display.width, result.display.height) == (160, 120)


@pytest.mark.parametrize(("mode", "colour", "key"), [
    ("RGB", (10, 20, 30), (10, 20, 30)),
    ("L", 7, 7),
    ("I;16", 3000, 3000),
])
def test_a_colour_key_png_keeps_its_transparency(
        mode: str, colour: object, key: object) -> None:
    """PNG's tRNS chunk marks one colour (or grey level) as clear, with no alpha channel."""
    image = Image.new(mode, (200, 100), colour)  # type: ignore[arg-type]
    image.paste(Image.new(mode, (100, 100), 60000 if mode == "I;16" else (
        (200, 200, 200) if mode == "RGB" else 200)), (0, 0))  # type: ignore[arg-type]
    result = make_derivatives(encode(image, "PNG", transparency=key), SMALL)
    assert result.display.content_type == "image/webp"
    for derivative in (result.display, result.thumb, result.placeholder):
        out = opened(derivative).convert("RGBA")
        assert out.getpixel((1, 1))[3] == 255
        assert out.getpixel((out.width - 2, 1))[3] == 0
    assert base64.b64decode(result.thumbhash)[2] & 0x80  # the hash records alpha


def _decode_under_limit(script: str) -> str:
    """Run ``script`` after loading the decoders, with the address space capped at what the
    interpreter has plus 200 MiB; returns what it printed."""
    prelude = textwrap.dedent(
        """
        import resource
        from PIL import Image
        from memvault.derivatives import DerivativeOptions, Unsupported, make_derivatives
        from tests.image_corpus import encode, lying_png
        make_derivatives(encode(Image.new("RGB", (64, 64)), "PNG"))  # load plugins first

        def limited():
            with open("/proc/self/status") as f:
                vm = next(int(l.split()[1]) for l in f if l.startswith("VmSize:")) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (vm + 200 * 2**20, resource.RLIM_INFINITY))

        def attempt(source, options):
            try:
                make_derivatives(source, options)
                print("made")
            except MemoryError:
                print("MemoryError")
            except Unsupported as exc:
                print(exc.code)
        """
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)], capture_output=True,
        text=True, check=True, cwd=Path(__file__).resolve().parent.parent, timeout=120,
    ).stdout.strip()


def test_a_decoder_out_of_memory_is_a_memory_error_not_corrupt() -> None:
    """WebP's decoder says "could not create decoder object" when it cannot get memory; that
    is a job to retry, not a corrupt photo."""
    out = _decode_under_limit(
        """
        webp = encode(Image.new("RGB", (6000, 6000), (40, 80, 120)), "WEBP", quality=50)
        limited()
        attempt(webp, DerivativeOptions())
        """
    )
    assert out == "MemoryError"


def test_a_pixel_limit_above_pillows_own_is_honoured() -> None:
    """195 MP is past Pillow's own refusal (2 x 89 MP): with max_pixels at 300 M the image
    is decoded (here it runs out of the test's memory), not refused as a bomb."""
    out = _decode_under_limit(
        """
        limited()
        attempt(lying_png(15_000, 13_000), DerivativeOptions(max_pixels=300_000_000))
        attempt(lying_png(15_000, 13_000), DerivativeOptions(max_pixels=100_000_000))
        """
    )
    assert out.splitlines() == ["MemoryError", "too_many_pixels"]


def test_a_damaged_whole_webp_is_corrupt_where_memory_is_not_limited() -> None:
    """WebP says "could not create decoder object" for a damaged file as for no memory:
    without a memory limit that can only be damage."""
    webp = encode(Image.new("RGB", (64, 64), (40, 80, 120)), "WEBP")
    damaged = webp[:20] + bytes(len(webp) - 20)
    assert _refusal(damaged).code == "corrupt"
