"""Checks on what callers hand the services: text, media types and free-form metadata.

Everything a caller names is stored and later served back, in JSON, in HTTP headers and in
PostgreSQL's text and JSON columns, none of which take every Python string: PostgreSQL
refuses U+0000 in text and NaN in JSON, an unpaired surrogate cannot be encoded as UTF-8 at
all, and a header value must be visible ASCII. A value that would fail there fails here, at
the service's door, as ``invalid_argument``, before anything is written; so nothing accepted
can later turn into an error on read (docs/decisions.md, "Inputs are checked where they are
stored").
"""

from __future__ import annotations

import math
import re
from typing import Any

from memvault.errors import InvalidArgument

METADATA_DEPTH = 32
"""Nesting a memory's ``metadata`` may have (objects and arrays inside one another)."""

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[\t !#-\[\]-~]|\\[\t -~])*"'
_MEDIA_TYPE = re.compile(
    rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|{_QUOTED}))*"
)
"""RFC 9110 §8.3.1 ``media-type``: what may stand in a ``Content-Type`` header."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
"""Not in a capsule or principal name or a title: control characters, unpaired surrogates."""
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
"""Not anywhere: U+0000 (PostgreSQL text refuses it) and unpaired surrogates (not UTF-8)."""


def text(value: str, what: str, *, max_length: int, min_length: int = 1) -> str:
    """``value`` if it is ``min_length``-``max_length`` characters of one-line text: no
    control characters (U+0000-U+001F, U+007F-U+009F) and no unpaired surrogates."""
    _length(value, what, min_length, max_length)
    _refuse(_CONTROL, value, what, "control characters")
    return value


def name(value: str, what: str, *, max_length: int) -> str:
    """``value`` if it is 1-``max_length`` characters any store keeps: a file name or a key
    the client chose, taken as it is (macOS's ``Icon\r``, a tab in a file name), but for
    U+0000 and unpaired surrogates."""
    _length(value, what, 1, max_length)
    _refuse(_UNSTORABLE, value, what, "U+0000")
    return value


def _length(value: str, what: str, least: int, most: int) -> None:
    if not least <= len(value) <= most:
        raise InvalidArgument(f"{what} must be {least}-{most} characters", length=len(value))


def media_type(value: str) -> str:
    """``value`` if it is a media type an HTTP ``Content-Type`` can carry (``type/subtype``
    and parameters, visible ASCII), at most 200 characters."""
    if len(value) > 200 or not _MEDIA_TYPE.fullmatch(value):
        raise InvalidArgument(
            "content_type must be a media type such as image/jpeg or "
            "text/plain; charset=utf-8 (ASCII, at most 200 characters)",
            content_type=value[:200],
        )
    return value


def is_media_type(value: str) -> bool:
    return len(value) <= 200 and _MEDIA_TYPE.fullmatch(value) is not None


def metadata(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` if it is JSON any store keeps as given: nested at most ``METADATA_DEPTH``
    deep, numbers finite, no U+0000 or unpaired surrogate in keys and strings (line
    breaks and tabs are fine there)."""
    _json(value, 1)
    return value


def _json(value: Any, depth: int) -> None:
    """``depth`` counts objects and arrays: 32 nested objects may hold a scalar."""
    if isinstance(value, dict | list) and depth > METADATA_DEPTH:
        raise InvalidArgument(f"metadata is nested more than {METADATA_DEPTH} levels deep",
                              limit=METADATA_DEPTH)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgument("metadata keys must be strings")
            _refuse(_UNSTORABLE, key, "a metadata key", "U+0000")
            _json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _json(item, depth + 1)
    elif isinstance(value, str):
        _refuse(_UNSTORABLE, value, "a metadata string", "U+0000")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgument("metadata numbers must be finite (no NaN or Infinity)")
    elif value is not None and not isinstance(value, bool | int):
        raise InvalidArgument(f"metadata cannot hold a {type(value).__name__}")


def _refuse(pattern: re.Pattern[str], value: str, what: str, kind: str) -> None:
    found = pattern.search(value)
    if found is not None:
        raise InvalidArgument(f"{what} must not contain {kind} or unpaired surrogates "
                              f"(found U+{ord(found.group()):04X})")
