"""The loop pacer's logic (loop_pacing.py) on a plain asyncio loop: no engine. The bounds are
loose on purpose (a paced loop runs ~10 iterations in these 0.5 s, a free one thousands),
so they hold on a loaded machine."""

from __future__ import annotations

import asyncio

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


def test_an_idle_engine_leaves_the_loop_free() -> None:
    pacer = LoopPacer(lambda: False, interval=0.05)
    assert asyncio.run(_iterations(pacer, 0.5)) > 300
    assert pacer.paced_seconds == 0


def test_a_realtime_arrival_stops_pacing_for_its_hold() -> None:
    pacer = LoopPacer(lambda: True, interval=0.05)
    pacer.hold(30)
    assert asyncio.run(_iterations(pacer, 0.5)) > 300
    assert pacer.paced_seconds == 0


def test_the_engine_is_asked_on_every_iteration_so_pacing_ends_with_the_batch() -> None:
    calls = 0

    def busy() -> bool:
        nonlocal calls
        calls += 1
        return calls <= 3  # three paced iterations, then the batch is over

    pacer = LoopPacer(busy, interval=0.05)
    assert asyncio.run(_iterations(pacer, 0.5)) > 300
    assert 0.05 < pacer.paced_seconds < 0.3


def test_zero_interval_never_starts() -> None:
    pacer = LoopPacer(lambda: True, interval=0)
    assert asyncio.run(_iterations(pacer, 0.2)) > 100
    assert pacer.paced_seconds == 0


def test_no_pacing_while_a_request_other_than_a_poll_is_in_flight() -> None:
    pacer = LoopPacer(lambda: True, interval=0.05)

    async def upload_in_flight() -> int:
        with pacer.unpaced():
            return await _iterations(pacer, 0.5)

    assert asyncio.run(upload_in_flight()) > 300
    assert pacer.paced_seconds == 0
    # Once it ends, pacing resumes.
    assert asyncio.run(_iterations(pacer, 0.5)) <= 30
