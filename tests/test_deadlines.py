"""`upstream.Deadlines`: the upstream calls' timeouts, one timer for all calls of one length.

It stands in for `asyncio.timeout`, so it is held to what that promises: a block past its deadline
raises TimeoutError (and only then), on time whatever else is waiting; a cancellation from
elsewhere stays a cancellation; the task is left as it was found.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.web.upstream import Deadlines


async def _wait(deadlines: Deadlines, seconds: float, sleep: float) -> float:
    """Sleep `sleep` under a deadline of `seconds`; the time it took (TimeoutError passes through)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with deadlines.expiring(seconds):
        await asyncio.sleep(sleep)
    return loop.time() - started


async def test_a_block_past_its_deadline_raises_timeout_error_on_time() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await _wait(deadlines, 0.05, 5)
    assert 0.04 <= loop.time() - started < 0.5
    assert await _wait(deadlines, 5, 0.01) < 1  # within its deadline: no error
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    assert deadlines.waiting == {0.05: {}, 5: {}}


async def test_many_calls_of_one_length_each_expire_on_time_with_one_timer() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()

    async def call(start_after: float, sleep: float) -> float | str:
        await asyncio.sleep(start_after)
        started = loop.time()
        try:
            await _wait(deadlines, 0.2, sleep)
        except TimeoutError:
            return loop.time() - started
        return "done"

    # Started 0.1 s apart; the first ends early (its timer then serves the next), the rest stall.
    results = await asyncio.gather(call(0, 0.01), call(0.1, 5), call(0.2, 5), call(0.3, 0.05))
    assert results[0] == "done" and results[3] == "done"
    for took in results[1:3]:
        assert isinstance(took, float) and 0.19 <= took < 0.6


async def test_a_shorter_deadline_started_later_is_not_held_up_by_a_longer_one() -> None:
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    long = asyncio.ensure_future(_wait(deadlines, 10, 5))
    await asyncio.sleep(0.01)
    started = loop.time()
    with pytest.raises(TimeoutError):
        await _wait(deadlines, 0.05, 5)
    assert loop.time() - started < 0.5
    long.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    deadlines = Deadlines()
    task = asyncio.ensure_future(_wait(deadlines, 10, 5))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert deadlines.waiting[10] == {}


async def test_cancelled_from_elsewhere_as_the_deadline_passes_is_still_a_cancellation() -> None:
    deadlines = Deadlines()
    outcome: list[str] = []

    async def call() -> None:
        with deadlines.expiring(0.05):
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                # The deadline's cancellation has arrived; the task is cancelled again meanwhile,
                # as a shutdown would: that one must not be swallowed as a timeout.
                asyncio.current_task().cancel()  # type: ignore[union-attr]
                outcome.append("cancelled twice")
                raise

    task = asyncio.ensure_future(call())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert outcome == ["cancelled twice"]
