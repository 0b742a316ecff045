"""Chunk transfers in flight: a per-process limit, global and per principal.

Taking a slot is one synchronous step (no ``await`` inside), so under asyncio it either
happens whole or not at all: there is no point at which a cancellation, a disconnect or an
error can leave a slot half-taken. Giving it back happens in ``finally`` of the one context
manager that took it, so every way out of a transfer (success, typed error, client
disconnect, cancellation, timeout) returns it. The counters are per process by design: they
bound this process's sockets, threads and memory; limits that must hold across processes
(pending sessions, quotas) live in the database.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from memvault.errors import ResourceExhausted

RETRY_AFTER = 1.0
"""Seconds a refused transfer is told to wait: slots turn over as fast as chunks arrive."""


class TransferSlots:
    def __init__(self, total: int, per_principal: int) -> None:
        if total < 1 or per_principal < 1:
            raise ValueError("slot limits must be at least 1")
        self.total = total
        self.per_principal = per_principal
        self._held: dict[str, int] = {}
        self._in_use = 0

    @property
    def in_use(self) -> int:
        return self._in_use

    def held_by(self, principal_id: str) -> int:
        return self._held.get(principal_id, 0)

    @contextlib.contextmanager
    def hold(self, principal_id: str) -> Iterator[None]:
        """Hold one slot for the block, or raise ``resource_exhausted`` (429) at once."""
        self._take(principal_id)
        try:
            yield
        finally:
            self._give(principal_id)

    def _take(self, principal_id: str) -> None:
        if self._in_use >= self.total:
            raise ResourceExhausted(
                f"the server is receiving {self._in_use} chunks already (limit {self.total}); "
                "retry shortly",
                retry_after=RETRY_AFTER, limit_name="transfer_slots",
                active=self._in_use, limit=self.total,
            )
        mine = self._held.get(principal_id, 0)
        if mine >= self.per_principal:
            raise ResourceExhausted(
                f"you have {mine} chunk transfers in flight (limit {self.per_principal}); "
                "retry when one completes",
                retry_after=RETRY_AFTER, limit_name="transfer_slots_per_principal",
                active=mine, limit=self.per_principal,
            )
        self._in_use += 1
        self._held[principal_id] = mine + 1

    def _give(self, principal_id: str) -> None:
        self._in_use -= 1
        left = self._held[principal_id] - 1
        if left:
            self._held[principal_id] = left
        else:
            del self._held[principal_id]
