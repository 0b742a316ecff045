"""Identifiers: a short type prefix and 128 random bits, e.g. ``mem_3f2a...``."""

from __future__ import annotations

import re
import secrets

_ID = re.compile(r"([a-z]{3})_[0-9a-f]{32}")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def is_id(value: str, prefix: str) -> bool:
    """Whether ``value`` has the shape of an id this server issues with ``prefix``.

    Anything else names nothing, so a lookup can answer ``not_found`` without asking the
    database (which may refuse such a value outright: PostgreSQL and U+0000)."""
    match = _ID.fullmatch(value)
    return match is not None and match.group(1) == prefix
