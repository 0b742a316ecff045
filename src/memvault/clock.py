"""Time as a port, so expiry can be tested with a clock the test moves."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


def iso(ts: float | None) -> str | None:
    """Epoch seconds as an RFC 3339 UTC timestamp, the form every API response uses."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to; for tests and simulations."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds
