"""asyncio helpers shared by the services."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def uncancelled(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` to its end even if the caller is cancelled meanwhile, then raise
    that cancellation; otherwise return its result.

    For steps that must not be left half done (a transaction on a thread, which cannot be
    interrupted anyway; a file moved aside that must be dropped or put back): when this
    returns or raises, the outcome is settled and a cleanup that follows sees it.
    """
    future = asyncio.ensure_future(awaitable)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(future)
            break
        except asyncio.CancelledError:
            if future.done():
                raise
            cancelled = True
        except BaseException as exc:
            if cancelled:  # the cancellation still stands; the failure rides along
                raise asyncio.CancelledError from exc
            raise
    if cancelled:
        raise asyncio.CancelledError
    return result
