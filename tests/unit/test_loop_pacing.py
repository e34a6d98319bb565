"""The loop pacer's logic (loop_pacing.py) on a plain asyncio loop: no engine. The bounds are
loose on purpose (a paced loop runs ~10 iterations in these 0.5 s, a free one thousands),
so they hold on a loaded machine."""

from __future__ import annotations

import asyncio

import pytest

from batchd.loop_pacing import LoopPacer


async def _iterations(pacer: LoopPacer, seconds: float) -> int:
    """Loop iterations in ``seconds`` with ``pacer`` running: a callback that re-arms itself
    runs once per iteration."""
    loop = asyncio.get_running_loop()
    count = 0

    def spin() -> None:
        nonlocal count
        count += 1
        handle[0] = loop.call_soon(spin)

    handle = [loop.call_soon(spin)]
    pacer.start()
    await asyncio.sleep(seconds)
    pacer.stop()
    handle[0].cancel()
    return count


def test_a_busy_engine_paces_the_loop_to_one_iteration_per_interval() -> None:
    pacer = LoopPacer(lambda: True, interval=0.05)
    iterations = asyncio.run(_iterations(pacer, 0.5))
    assert iterations <= 30  # ~10 at one per 50 ms
    assert pacer.paced_seconds > 0.2


def test_the_engine_is_asked_on_every_iteration_so_pacing_ends_with_the_batch() -> None:
    calls = 0

    def busy() -> bool:
        nonlocal calls
        calls += 1
        return calls <= 3  # three paced iterations, then the batch is over

    pacer = LoopPacer(busy, interval=0.05)
    assert asyncio.run(_iterations(pacer, 0.5)) > 300
    assert 0.05 < pacer.paced_seconds < 0.3


def _run_free(pacer: LoopPacer, *, hold: float = 0, in_flight: bool = False) -> int:
    if hold:
        pacer.hold(hold)

    async def run() -> int:
        if in_flight:
            with pacer.unpaced():
                return await _iterations(pacer, 0.5)
        return await _iterations(pacer, 0.5)

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("case", "busy", "interval", "hold", "in_flight"),
    [
        ("an idle engine", False, 0.05, 0, False),
        ("a realtime arrival's hold", True, 0.05, 30, False),
        ("a request other than a poll in flight", True, 0.05, 0, True),
        ("an interval of zero", True, 0, 0, False),
    ],
)
def test_the_loop_runs_free_with(
    case: str, busy: bool, interval: float, hold: float, in_flight: bool
) -> None:
    pacer = LoopPacer(lambda: busy, interval=interval)
    assert _run_free(pacer, hold=hold, in_flight=in_flight) > 300, case
    assert pacer.paced_seconds == 0, case


def test_pacing_resumes_once_the_request_in_flight_ends() -> None:
    pacer = LoopPacer(lambda: True, interval=0.05)
    assert _run_free(pacer, in_flight=True) > 300
    assert asyncio.run(_iterations(pacer, 0.5)) <= 30
