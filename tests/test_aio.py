"""``uncancelled``: a step carried through its caller's cancellation, which is then raised."""

from __future__ import annotations

import asyncio

import pytest

from memvault.aio import uncancelled


async def test_returns_the_result_when_left_alone() -> None:
    async def step() -> int:
        await asyncio.sleep(0)
        return 7

    assert await uncancelled(step()) == 7


async def test_a_cancelled_caller_waits_for_the_step_then_raises_the_cancellation() -> None:
    started, go_on, done = asyncio.Event(), asyncio.Event(), []

    async def step() -> None:
        started.set()
        await go_on.wait()
        done.append(True)

    caller = asyncio.create_task(uncancelled(step()))
    await started.wait()
    caller.cancel()
    await asyncio.sleep(0)
    assert not caller.done(), "returned before the step ended"
    caller.cancel()  # twice, as a shutdown that insists
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert done == [True]


async def test_a_step_failing_after_the_cancellation_still_raises_the_cancellation() -> None:
    """(Found by review: the failure replaced the cancellation, and a reaper being shut down
    went on to its next row.)"""
    started, go_on = asyncio.Event(), asyncio.Event()

    async def step() -> None:
        started.set()
        await go_on.wait()
        raise ConnectionResetError("database went away")

    caller = asyncio.create_task(uncancelled(step()))
    await started.wait()
    caller.cancel()
    await asyncio.sleep(0)
    go_on.set()
    with pytest.raises(asyncio.CancelledError) as raised:
        await caller
    assert isinstance(raised.value.__cause__, ConnectionResetError)


async def test_a_failure_without_cancellation_is_raised_as_it_is() -> None:
    async def step() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        await uncancelled(step())
