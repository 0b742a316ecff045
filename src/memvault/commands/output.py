"""Consoles, plain tables and JSON for the client commands.

Human output goes through rich consoles (stdout for results, stderr for failures); tables
are plain aligned text, so an id is never cut short on a narrow or non-terminal output.
``--json`` prints one JSON document on stdout and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
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
