"""Consoles, plain tables and JSON for the client commands.

Human output goes through rich consoles (stdout for results, stderr for failures); tables
are plain aligned text, so an id is never cut short on a narrow or non-terminal output.
``--json`` prints one JSON document on stdout and nothing else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from rich.console import Console

_OTHER_CONTROLS = r"\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(rf"[\x00-\x1f{_OTHER_CONTROLS}]")
_UNSAFE_BUT_NEWLINE = re.compile(rf"[\x00-\x09\x0b-\x1f{_OTHER_CONTROLS}]")


def shown(text: str) -> str:
    """Text from a file system or a server, as one line a terminal only displays: control
    characters (ESC, BEL, CR, LF, C1, line separators, bidi overrides) are written as
    escapes (``\\x1b``, ``\\n``). A file name may hold any of them, and another
    principal's file names reach an admin's terminal through ``memvault admin sessions``."""
    return _UNSAFE.sub(_escape, text)


def _escape(found: re.Match[str]) -> str:
    return found.group().encode("unicode_escape").decode("ascii")


class _Console(Console):
    """A console that never passes a control character on, whatever a message quotes (a
    server's ``detail`` can name a file); line breaks of memvault's own messages stay."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(_UNSAFE_BUT_NEWLINE.sub(_escape, o) if isinstance(o, str) else o
                        for o in objects), **kwargs)


out = _Console(highlight=False, soft_wrap=True)
err = _Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    rows = [[shown(cell) for cell in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out.print(line(headers), markup=False, style="bold")
    for row in rows:
        out.print(line(row), markup=False)


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def when(iso: str | None) -> str:
    return (iso or "")[:19].replace("T", " ")
