from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from batchd.engines import registry
from batchd.engines.openai_http.sse import StreamUsage as _StreamUsage
from batchd.engines.openai_http.upstream import (
    PoolSlots,
    TokenBucket,
    Upstream,
    is_retryable_status,
    parse_retry_after,
)
from batchd.errors import ConfigError

GOOD = """
[llamacpp]
max_seqs = 8

[models.local]
engine = "llamacpp"
aliases = ["default"]

[models.big]
engine = "openai-http"
base_urls = ["http://a:8000/v1/", "http://b:8000/v1"]
upstream_model = "meta/llama"
api_key_env = "BIG_KEY"
max_concurrency = 4
requests_per_minute = 120
tokens_per_minute = 10000
"""


def test_a_good_registry_parses_and_reads_the_key_from_the_environment() -> None:
    reg = registry.parse(GOOD, source="t.toml", environ={"BIG_KEY": "sk-1"})
    assert set(reg.llamacpp_models()) == {"local"}
    big = reg.upstream_models()["big"]
    assert big.urls == ("http://a:8000/v1", "http://b:8000/v1")
    assert reg.api_keys["big"] == "sk-1"
    assert reg.llamacpp.max_seqs == 8
    assert big.responses == "chat"  # Responses requests are translated unless told otherwise
    native = registry.parse(
        GOOD.replace("max_concurrency = 4", 'max_concurrency = 4\nresponses = "native"'),
        source="t.toml",
        environ={"BIG_KEY": "sk-1"},
    )
    assert native.upstream_models()["big"].responses == "native"


@pytest.mark.parametrize(
    ("text", "environ", "named"),
    [
        (GOOD, {}, "models.big.api_key_env: the environment variable BIG_KEY is not set"),
        (
            GOOD.replace("max_concurrency = 4", "max_concurency = 4"),
            {"BIG_KEY": "k"},
            "max_concurency",
        ),
        (
            GOOD.replace("max_concurrency = 4", "max_concurrency = 0"),
            {"BIG_KEY": "k"},
            "models.big.max_concurrency",
        ),
        (GOOD.replace('"openai-http"', '"vllm-magic"'), {"BIG_KEY": "k"}, "models.big"),
        (GOOD.replace("http://b:8000/v1", "ftp://b"), {"BIG_KEY": "k"}, "models.big.base_urls"),
        (GOOD.replace("max_seqs = 8", "max_seqs = "), {}, "line 3"),
        (
            GOOD
            + '\n[models.other]\nengine = "openai-http"\nbase_url = "http://c/v1"\naliases = ["default"]\n',
            {"BIG_KEY": "k"},
            "'default' already names",
        ),
        (
            GOOD.replace("max_concurrency = 4", 'responses = "both"'),
            {"BIG_KEY": "k"},
            "models.big.responses",
        ),
        ("[llamacpp]\n", {}, "models"),
        ('[models.x]\nengine = "openai-http"\n', {}, "exactly one of base_url or base_urls"),
    ],
)
def test_config_errors_name_the_key_or_line(text: str, environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        registry.parse(text, source="t.toml", environ=environ)
    assert named in str(excinfo.value)
    assert str(excinfo.value).startswith("t.toml")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        registry.load(tmp_path / "nope.toml")


def test_retry_after_forms() -> None:
    assert parse_retry_after("3") == 3
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0  # in the past: now
    assert parse_retry_after("99999") == 600  # clamped


def test_token_bucket_is_settled_by_reported_usage() -> None:
    async def scenario() -> None:
        upstream = Upstream(
            "http://x/v1", max_concurrency=1, requests_per_minute=None, tokens_per_minute=600
        )
        assert upstream.tokens is not None
        await upstream.within_rates(500)
        check(upstream)

    asyncio.run(scenario())


def check(upstream: Upstream) -> None:
    assert upstream.tokens is not None
    assert not upstream.tokens.has_capacity(200)  # 500 of 600 charged
    upstream.settle_tokens(500, 100)  # the answer used 100: 400 refunded
    assert upstream.tokens.has_capacity(400)
    upstream.settle_tokens(100, 700)  # under-estimated by 600: charged as debt
    assert not upstream.tokens.has_capacity(1)


def test_token_bucket_refund_never_goes_negative() -> None:
    async def scenario() -> None:
        bucket = TokenBucket(100, 60)
        bucket.refund(50)
        assert bucket.has_capacity(100) and not bucket.has_capacity(101)

    asyncio.run(scenario())


def test_only_429_and_5xx_statuses_are_retried() -> None:
    assert is_retryable_status(429) and is_retryable_status(500) and is_retryable_status(503)
    for final in (400, 401, 403, 404, 408, 409, 413, 422):
        assert not is_retryable_status(final), final


def test_pool_slots_go_to_realtime_waiters_first_then_in_arrival_order() -> None:
    async def scenario() -> None:
        slots = PoolSlots(1)
        await slots.acquire(1)  # the one slot is taken
        order: list[str] = []

        async def wait(name: str, priority: int) -> None:
            await slots.acquire(priority)
            order.append(name)

        tasks = [
            asyncio.create_task(wait("batch-1", 1)),
            asyncio.create_task(wait("batch-2", 1)),
            asyncio.create_task(wait("realtime", 0)),
        ]
        await asyncio.sleep(0)
        assert slots.waiting() == 3
        for _ in tasks:
            slots.release()
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert order == ["realtime", "batch-1", "batch-2"]
        slots.release()
        assert slots.free == 1 and slots.waiting() == 0

    asyncio.run(scenario())


def test_a_pool_slot_handed_to_a_cancelled_waiter_is_passed_on() -> None:
    async def scenario() -> None:
        slots = PoolSlots(1)
        await slots.acquire(1)
        first = asyncio.create_task(slots.acquire(1))
        second = asyncio.create_task(slots.acquire(1))
        await asyncio.sleep(0)
        slots.release()  # handed to the first waiter...
        first.cancel()  # ...which is cancelled before it runs
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.wait_for(second, 1)  # the slot went on to the next one
        assert slots.free == 0 and slots.waiting() == 0
        third = asyncio.create_task(slots.acquire(1))
        await asyncio.sleep(0)
        third.cancel()  # cancelled while waiting: it leaves the queue
        await asyncio.gather(third, return_exceptions=True)
        assert slots.waiting() == 0
        slots.release()
        assert slots.free == 1

    asyncio.run(scenario())


def test_stream_usage_is_read_across_chunk_boundaries() -> None:
    watcher = _StreamUsage()
    events = (
        b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3}}\n\n'
        b"data: [DONE]\n\n"
    )
    for start in range(0, len(events), 7):  # cut anywhere, even inside the usage event
        watcher.feed(events[start : start + 7])
    assert watcher.found and (watcher.prompt, watcher.completion) == (12, 3)
    silent = _StreamUsage()
    silent.feed(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n')
    assert not silent.found
