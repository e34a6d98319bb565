"""The embedded llama.cpp engine on the bundled model: correctness inside full batches."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from batchd.engines.base import ChatMessage, GenerationRequest, Priority, SamplingParams
from batchd.engines.llamacpp import zero_pages
from batchd.engines.llamacpp.engine import LlamaCppEngine
from batchd.errors import ContextLengthExceeded, ModelNotFound

T = TypeVar("T")
SYSTEM = (
    "You are a careful assistant for a library. Opening hours are 9 to 5 on weekdays and 10 to "
    "2 on Saturdays. Books may be borrowed for three weeks and renewed twice online. Late fees "
    "are ten cents a day. Members may reserve up to five books at a time. Always answer in one "
    "short sentence and never invent rules that are not listed here."
)


class EngineHarness:
    """One engine and one event loop shared by the module (loading takes a second or two)."""

    def __init__(self, data_dir: Path, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        sizes = {"max_seqs": 24, "ctx_size": 24 * 1024}
        self.engine = LlamaCppEngine(models=[], data_dir=data_dir, **{**sizes, **options})
        self.run(self.engine.start())

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)  # type: ignore[arg-type]

    def close(self) -> None:
        self.run(self.engine.close())
        self.loop.close()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineHarness]:
    h = EngineHarness(tmp_path_factory.mktemp("engine"))
    yield h
    h.close()


def chat(
    text: str,
    max_tokens: int = 16,
    system: str | None = None,
    priority: Priority = Priority.BATCH,
    temperature: float = 0,
    **params: Any,
) -> GenerationRequest:
    messages = ((ChatMessage("system", system),) if system else ()) + (ChatMessage("user", text),)
    return GenerationRequest(
        model="default",
        params=SamplingParams(max_tokens=max_tokens, temperature=temperature, **params),
        messages=messages,
        priority=priority,
    )


def test_greedy_output_is_the_same_alone_and_inside_a_full_batch(harness: EngineHarness) -> None:
    probe = chat("Name three planets of the solar system.", max_tokens=24)
    alone = harness.run(harness.engine.generate(probe))
    others = [chat(f"Write a poem about the number {i}.", max_tokens=24) for i in range(16)]

    async def crowded() -> list[Any]:
        return await asyncio.gather(
            *(harness.engine.generate(r) for r in [*others[:8], probe, *others[8:]])
        )

    crowd = harness.run(crowded())
    # The same token ids in the same KV layout; llama.cpp may pick other matmul kernels for a
    # batch of 17 rows than for 1, so logits can differ in the last float bits. Greedy argmax
    # is stable unless two candidates tie within that noise, which this prompt does not hit:
    # we require identical text, and the token counts must match exactly.
    assert crowd[8].text == alone.text
    assert crowd[8].completion_tokens == alone.completion_tokens
    assert crowd[8].prompt_tokens == alone.prompt_tokens


def test_stop_sequences_and_max_tokens_inside_a_full_batch(harness: EngineHarness) -> None:
    free = harness.run(harness.engine.generate(chat("Count from 1 to 20 separated by commas.", 40)))
    assert free.finish_reason == "length" and free.completion_tokens == 40
    middle = len(free.text) // 2
    stop = free.text[middle : middle + 3]
    expected = free.text[: free.text.find(stop)]

    async def mixed() -> list[Any]:
        requests = [chat("Count from 1 to 20 separated by commas.", 40, stop=(stop,))]
        requests += [chat(f"Say something about {i}.", max_tokens=1 + i % 5) for i in range(20)]
        return await asyncio.gather(*(harness.engine.generate(r) for r in requests))

    results = harness.run(mixed())
    stopped = results[0]
    assert stopped.finish_reason == "stop" and stopped.stop_sequence == stop
    assert stopped.text == expected
    for i, result in enumerate(results[1:]):
        assert result.completion_tokens <= 1 + i % 5
        if result.finish_reason == "length":
            assert result.completion_tokens == 1 + i % 5


def test_token_counts_are_exact(harness: EngineHarness) -> None:
    request = chat("Hello there!", max_tokens=12)
    result = harness.run(harness.engine.generate(request))
    runner = next(iter(harness.engine.runners.values()))
    assert result.prompt_tokens == len(runner.prompt_tokens(request))
    retokenized = runner.tokenize(result.text, add_special=False)
    # Detokenize -> tokenize may merge differently at the edges, but never by much.
    assert abs(len(retokenized) - result.completion_tokens) <= 2
    completion = GenerationRequest(
        model="default", params=SamplingParams(max_tokens=5, temperature=0), prompt="The sky is"
    )
    result = harness.run(harness.engine.generate(completion))
    assert result.prompt_tokens == len(runner.tokenize("The sky is", add_special=runner.add_bos))
    assert result.completion_tokens <= 5


def test_context_and_model_errors(harness: EngineHarness) -> None:
    with pytest.raises(ContextLengthExceeded) as excinfo:
        harness.run(harness.engine.generate(chat("hi", max_tokens=100_000)))
    assert "maximum context length" in excinfo.value.message
    unknown = GenerationRequest(model="nope", params=SamplingParams(max_tokens=1), prompt="x")
    with pytest.raises(ModelNotFound):
        harness.run(harness.engine.generate(unknown))


def test_cancelling_frees_the_sequence_and_the_engine_keeps_serving(harness: EngineHarness) -> None:
    runner = next(iter(harness.engine.runners.values()))

    async def cancel_one() -> None:
        task = asyncio.create_task(
            harness.engine.generate(chat("Write a long story.", max_tokens=400))
        )
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if not runner.active:
                break
            await asyncio.sleep(0.05)

    harness.run(cancel_one())
    assert not runner.active
    assert len(runner.free_slots) == harness.engine.options.max_seqs
    result = harness.run(harness.engine.generate(chat("Say yes.", max_tokens=3)))
    assert result.completion_tokens >= 1


def test_realtime_request_finishes_while_batch_work_runs(harness: EngineHarness) -> None:
    async def scenario() -> tuple[Any, list[Any], float, float]:
        loop = asyncio.get_running_loop()
        batch = [
            asyncio.create_task(harness.engine.generate(chat(f"Essay {i}", max_tokens=64)))
            for i in range(20)
        ]
        await asyncio.sleep(1.0)
        start = loop.time()
        realtime = await harness.engine.generate(
            chat("Say hello.", max_tokens=8, priority=Priority.REALTIME)
        )
        realtime_done = loop.time() - start
        results = await asyncio.gather(*batch)
        return realtime, results, realtime_done, loop.time() - start

    realtime, results, realtime_seconds, batch_seconds = harness.run(scenario())
    assert realtime.completion_tokens >= 1
    assert realtime_seconds < batch_seconds, "realtime must not wait for the batch to drain"
    assert all(r.completion_tokens == 64 or r.finish_reason == "stop" for r in results)


def test_shared_prefix_is_reported_and_changes_nothing(
    tmp_path: Path, harness: EngineHarness
) -> None:
    questions = [
        "When do you open on Saturday?",
        "How long can I keep a book?",
        "What is the late fee?",
        "How many books can I reserve?",
    ]

    def run_all(h: EngineHarness) -> list[Any]:
        async def go() -> list[Any]:
            return await asyncio.gather(
                *(h.engine.generate(chat(q, 16, system=SYSTEM)) for q in questions)
            )

        return h.run(go())

    shared = run_all(harness)
    unshared_harness = EngineHarness(tmp_path, prefix_sharing=False)
    try:
        unshared = run_all(unshared_harness)
    finally:
        unshared_harness.close()
    assert all(r.cached_tokens == 0 for r in unshared)
    assert sum(r.cached_tokens for r in shared) > 0
    for r in shared:
        assert r.cached_tokens < r.prompt_tokens
    assert [r.text for r in shared] == [r.text for r in unshared]
    assert [r.prompt_tokens for r in shared] == [r.prompt_tokens for r in unshared]


def test_realtime_sharing_a_prefix_with_paused_batch_work_does_not_wait_for_it(
    harness: EngineHarness,
) -> None:
    # Batch sequences with a long shared prompt are mid-prefill when a realtime request with the
    # same prefix arrives: batch work steps aside for it, so it must not wait on them as donors.
    async def scenario() -> tuple[Any, list[Any]]:
        batch = [
            asyncio.create_task(
                harness.engine.generate(chat(f"Question {i}?", 8, system=SYSTEM * 3))
            )
            for i in range(12)
        ]
        await asyncio.sleep(0.2)
        realtime = await asyncio.wait_for(
            harness.engine.generate(chat("Hi?", 4, system=SYSTEM * 3, priority=Priority.REALTIME)),
            timeout=60,
        )
        return realtime, await asyncio.wait_for(asyncio.gather(*batch), timeout=120)

    realtime, results = harness.run(scenario())
    assert realtime.completion_tokens >= 1
    assert len(results) == 12 and all(r.completion_tokens >= 1 for r in results)


def test_a_finished_requests_kv_serves_later_prompts_that_start_the_same_way(
    tmp_path: Path,
) -> None:
    """The prefix cache: one request after another (none running beside it to share with),
    the later one starts from the earlier one's KV, and answers exactly as without it.
    Realtime requests, as conversations are: a realtime turn stays whole in the cache for
    its follow-up (a batch line's question and answer are dropped once another line
    adopts its system prompt: no line continues another's)."""
    realtime = Priority.REALTIME

    def conversation(h: EngineHarness) -> list[Any]:
        first = h.run(
            h.engine.generate(
                chat("When do you open on Saturday?", 8, system=SYSTEM, priority=realtime)
            )
        )
        second = h.run(
            h.engine.generate(chat("What is the late fee?", 8, system=SYSTEM, priority=realtime))
        )
        # The next turn of the first conversation: its prompt holds the first reply.
        follow_up = GenerationRequest(
            model="default",
            params=SamplingParams(max_tokens=8, temperature=0),
            messages=(
                ChatMessage("system", SYSTEM),
                ChatMessage("user", "When do you open on Saturday?"),
                ChatMessage("assistant", first.text),
                ChatMessage("user", "And on Sunday?"),
            ),
            priority=realtime,
        )
        third = h.run(h.engine.generate(follow_up))
        return [first, second, third]

    cached = EngineHarness(tmp_path / "cache-on")
    try:
        first, second, third = conversation(cached)
    finally:
        cached.close()
    plain = EngineHarness(tmp_path / "cache-off", prefix_cache=False)
    try:
        without = conversation(plain)
    finally:
        plain.close()
    assert first.cached_tokens == 0
    assert 40 < second.cached_tokens < second.prompt_tokens  # the system prompt and more
    assert third.cached_tokens >= first.prompt_tokens  # the first turn and its reply
    assert all(r.cached_tokens == 0 for r in without)
    assert [r.text for r in (first, second, third)] == [r.text for r in without]
    assert [r.prompt_tokens for r in (first, second, third)] == [r.prompt_tokens for r in without]


def test_the_prefix_cache_gives_way_to_running_work(tmp_path: Path) -> None:
    """More finished prompts than free slots, then a batch filling every slot: cached KV is
    evicted as slots are needed and every answer stays what it is without the cache."""

    def workload(h: EngineHarness) -> list[str]:
        async def go() -> list[str]:
            texts = []
            for i in range(6):  # one after another: each leaves its KV cached
                r = await h.engine.generate(chat(f"Say the number {i}.", 4, system=SYSTEM))
                texts.append(r.text)
            crowd = await asyncio.gather(
                *(
                    h.engine.generate(chat(f"Spell the word {i}.", 6, system=SYSTEM))
                    for i in range(10)
                )
            )
            return texts + [r.text for r in crowd]

        return h.run(go())

    small = {"max_seqs": 6, "ctx_size": 6 * 1024}
    on = EngineHarness(tmp_path / "on", **small)
    off = EngineHarness(tmp_path / "off", prefix_cache=False, **small)
    try:
        assert workload(on) == workload(off)
    finally:
        on.close()
        off.close()


def test_the_kv_cache_is_given_back_until_sequences_write_it(harness: EngineHarness) -> None:
    """llama.cpp clears the whole cache when the context is made; its zero pages are dropped
    right after, so resident memory follows the cells in use (zero_pages.py)."""
    runner = next(iter(harness.engine.runners.values()))
    whole = zero_pages.kv_cache_bytes(runner.model, 24 * 1024, 2)
    assert runner.kv_bytes_released >= 0.9 * whole


COUNTING = "Count from 1 to 50, separated by commas."


def test_a_priority_tier_request_is_admitted_ahead_of_waiting_realtime_ones(
    tmp_path: Path,
) -> None:
    # Two sequence slots, both taken by realtime requests, two more waiting: an urgent one
    # (service_tier "priority") arriving last starts next, before the two that waited longer.
    h = EngineHarness(tmp_path, max_seqs=2, ctx_size=2 * 1024, realtime_slots=1)
    try:

        async def scenario() -> list[str]:
            finished: list[str] = []

            async def run(name: str, request: GenerationRequest) -> None:
                await h.engine.generate(request)
                finished.append(name)

            realtime = [
                asyncio.create_task(
                    run(f"default-{i}", chat(COUNTING, 32, priority=Priority.REALTIME))
                )
                for i in range(4)
            ]
            await asyncio.sleep(0.02)  # two are running, two waiting
            urgent = replace(chat("Say hi.", 2, priority=Priority.REALTIME), urgent=True)
            await asyncio.gather(*realtime, run("priority", urgent))
            return finished

        finished = h.run(scenario())
    finally:
        h.close()
    assert finished.index("priority") < finished.index("default-2")
    assert finished.index("priority") < finished.index("default-3")
