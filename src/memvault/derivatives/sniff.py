"""Name common non-image files from their first bytes, so a refusal can say what the file is.

Only used to word ``Unsupported`` reasons: whether we decode a file is decided by Pillow's own
format detection restricted to ``ALLOWED_FORMATS``, never by these signatures or by a name or
content type a client sent.
"""

from __future__ import annotations

from typing import Final

#: Pillow format names we decode. Everything else is refused before any pixel is decoded: fewer
#: parsers exposed to untrusted bytes, and no surprises such as PSD, EPS (Ghostscript) or ICO.
ALLOWED_FORMATS: Final = (
    "JPEG",
    "MPO",  # JPEG with a Multi-Picture extension, as many phones and cameras write it
    "PNG",
    "WEBP",
    "GIF",
    "TIFF",
    "HEIF",  # pillow-heif: HEIC/HEIF
    "AVIF",
)

_PREFIXES: Final = (
    (b"%PDF-", "a PDF document"),
    (b"\x1a\x45\xdf\xa3", "a Matroska/WebM video"),
    (b"PK\x03\x04", "a ZIP archive (or an office document)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!", "a RAR archive"),
    (b"%!PS", "a PostScript file"),
    (b"8BPS", "a Photoshop document"),
    (b"ID3", "an MP3 audio file"),
    (b"OggS", "an Ogg media file"),
    (b"fLaC", "a FLAC audio file"),
    (b"\x00\x00\x01\xba", "an MPEG program stream video"),
)

_RIFF_KINDS: Final = {b"AVI ": "an AVI video", b"WAVE": "a WAV audio file"}

#: ISO base media ``ftyp`` major brands that are video or audio, not still images.
_VIDEO_BRANDS: Final = frozenset(
    {b"isom", b"iso2", b"mp41", b"mp42", b"avc1", b"qt  ", b"M4V ", b"M4A ", b"3gp4", b"3gp5"}
    | {b"3g2a", b"dash", b"MSNV", b"f4v ", b"crx "}
)


def describe(head: bytes) -> str | None:
    """What a file starting with ``head`` (≥ 16 bytes when available) is, if it is a known
    non-image format; ``None`` otherwise."""
    for prefix, what in _PREFIXES:
        if head.startswith(prefix):
            return what
    if head[:4] == b"RIFF" and head[8:12] in _RIFF_KINDS:
        return _RIFF_KINDS[head[8:12]]
    if head[4:8] == b"ftyp" and head[8:12] in _VIDEO_BRANDS:
        return f"an MP4/QuickTime video ({head[8:12].decode('latin-1').strip()})"
    if head.startswith(b"\x00\x00\x00") and head[4:8] in (b"moov", b"mdat", b"wide", b"free"):
        return "a QuickTime video"
    return None
