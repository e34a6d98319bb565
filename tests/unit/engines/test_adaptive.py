"""Adaptive concurrency toward an upstream, rule by rule (AIMD), with a fake clock."""

from __future__ import annotations

import asyncio

from batchd.engines.openai_http.adaptive import AdaptiveLimit
from batchd.engines.openai_http.timing import Clock

START_LIMIT = 2.0


class Ticks:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> Clock:
        return Clock(monotonic=lambda: self.now)


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_fast_answers_grow_the_limit_by_one_a_round_up_to_the_maximum() -> None:
    async def scenario() -> list[float]:
        limit = AdaptiveLimit("m", 4, latency_target=1.0, clock=Ticks().clock())
        assert limit.limit == 4.0  # it starts where it would be without it
        limit.limit = START_LIMIT
        seen = [limit.limit]
        for _ in range(12):
            await limit.admit()
            await limit.done(0.1, overloaded=False)
            seen.append(limit.limit)
        return seen

    seen = run(scenario())
    assert seen[0] == START_LIMIT
    assert seen[1] == START_LIMIT + 0.5  # each answer adds 1/limit
    assert START_LIMIT + 0.8 < seen[2] < START_LIMIT + 1  # so a round of answers, about one
    assert max(seen) == 4.0 and seen[-1] == 4.0  # never beyond max_concurrency


def test_a_429_or_a_slow_answer_halves_it_once_per_round() -> None:
    ticks = Ticks()

    async def scenario() -> list[float]:
        limit = AdaptiveLimit("m", 16, latency_target=2.0, clock=ticks.clock())
        limit.limit = 16.0
        seen = []
        # (seconds the attempt took, overloaded, when it ended)
        for seconds, overloaded, at in [(0.1, True, 0.0), (5.0, False, 0.5), (5.0, False, 6.0)]:
            ticks.now = at
            await limit.admit()
            await limit.done(seconds, overloaded)
            seen.append(limit.limit)
        for _ in range(10):
            ticks.now += 10
            await limit.admit()
            await limit.done(9.0, False)
        seen.append(limit.limit)
        return seen

    # Halved by the 429; the slow answer ending 0.5 s later was sent before that decrease (the
    # same burst); one sent after it, halved again; and never below one.
    assert run(scenario()) == [8.0, 8.0, 4.0, 1.0]


def test_an_attempt_waits_for_a_place_under_the_limit() -> None:
    async def scenario() -> list[str]:
        limit = AdaptiveLimit("m", 8, latency_target=1.0, clock=Ticks().clock())
        limit.limit = 1.0
        events: list[str] = []
        await limit.admit()

        async def second() -> None:
            await limit.admit()
            events.append("second admitted")

        waiting = asyncio.create_task(second())
        await asyncio.sleep(0.05)
        events.append("first done")
        await limit.done(0.1, overloaded=False)
        await asyncio.wait_for(waiting, 1)
        await limit.cancelled()
        assert limit.inflight == 0
        return events

    assert run(scenario()) == ["first done", "second admitted"]
