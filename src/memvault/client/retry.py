"""Which failures are worth another try, and how long to wait before it.

Transient: a connection that could not be made or broke, ``408 timeout``, ``429
resource_exhausted``, and 5xx answers other than ``507 insufficient_storage`` (a full disk or a
quota is not fixed by waiting a few seconds). Everything else is raised at once.

Waits grow exponentially with full jitter (``uniform(0, min(max_delay, base_delay * 2**n))``,
so many clients that failed together do not come back together) and never undercut the
server's ``Retry-After``. A request gives up after ``attempts`` tries or once waiting again
would take it past ``max_wait`` seconds in total; a ``Retry-After`` longer than what is left
(a daily quota resetting at midnight, a pending-session cap waiting for an expiry) is raised
at once rather than slept through.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

import httpx

from memvault.client.errors import BadResponse, UnknownError
from memvault.errors import (
    InsufficientStorage,
    MemvaultError,
    RequestTimeout,
    ResourceExhausted,
)

log = logging.getLogger("memvault.client")


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds on retrying one request. ``RetryPolicy(attempts=1)`` turns retries off."""

    attempts: int = 10
    """Tries per request, the first included."""
    max_wait: float = 300.0
    """Seconds one request may spend waiting between its tries, in total."""
    base_delay: float = 0.5
    max_delay: float = 30.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.max_wait < 0 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("waits must not be negative")

    def delay(self, retry: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first retry)."""
        backoff = self.rng.uniform(0, min(self.max_delay, self.base_delay * 2**retry))
        if retry_after is None:
            return backoff
        # At least what the server asked, plus a little jitter so waiters spread out.
        return retry_after + min(backoff, retry_after * 0.25)


def transient_status(error: MemvaultError) -> bool:
    """An error answer worth retrying (the request reached the server and was refused). One
    that is not memvault's, or of a code this SDK does not know, is judged by its HTTP
    status alone (its class's status says nothing)."""
    if isinstance(error, BadResponse | UnknownError):
        return error.http_status in (408, 429) or (
            error.http_status >= 500 and error.http_status not in (501, 505, 507))
    if isinstance(error, InsufficientStorage):
        return False
    return isinstance(error, RequestTimeout | ResourceExhausted) or error.status >= 500


def transient_transport(exc: httpx.TransportError, *, idempotent: bool) -> bool:
    """A connection failure worth retrying. A request that is not idempotent is retried only
    when it certainly never reached the server (it could not connect)."""
    if idempotent:
        return True
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


class Attempts:
    """The tries of one request under a policy: ``await attempts.wait(error)`` sleeps before
    the next try, or raises ``error`` (noting how long it tried) when the policy is spent."""

    def __init__(self, policy: RetryPolicy, what: str) -> None:
        self.policy = policy
        self.what = what
        self.count = 0
        self.waited = 0.0
        self.started = time.monotonic()

    def progressed(self) -> None:
        """The current try got somewhere (bytes of a body arrived): count afresh from here,
        so a long transfer over a link that breaks now and then is not given up on."""
        self.count = 0

    async def wait(self, error: MemvaultError) -> None:
        self.count += 1
        retry_after = error.retry_after
        wait = self.policy.delay(self.count - 1, retry_after)
        over_budget = self.waited + wait > self.policy.max_wait
        if self.count >= self.policy.attempts or over_budget:
            n = self.count
            error.add_note(
                f"gave up after {n} attempt{'s' if n > 1 else ''} over "
                f"{time.monotonic() - self.started:.1f} s"
                + (f" (the server asked to wait {retry_after:g} s more)"
                   if retry_after is not None and over_budget else ""))
            raise error
        log.info("retrying %s in %.2f s (attempt %d): %s: %s", self.what, wait, self.count,
                 error.code, error.detail)
        await asyncio.sleep(wait)
        self.waited += wait
