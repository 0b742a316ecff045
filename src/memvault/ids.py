"""Identifiers: a short type prefix and 128 random bits, e.g. ``mem_3f2a...``."""

from __future__ import annotations

import secrets


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"
