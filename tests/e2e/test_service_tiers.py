"""Service tiers on realtime requests through the official SDK, with the real engine: the tier
served is echoed, ``priority`` only for tenants allowed it, ``flex`` answered from batch
capacity or ended with a 429 after its timeout, and each tier counted in the metrics."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.support.helpers import chat_line, eventually, upload
from tests.support.serverproc import ServerProcess, running_server

VIP, PLAIN = "vip-key-000001", "plain-key-0001"
MESSAGES = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def tiered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("tiers")
    keys = data_dir.parent / f"{data_dir.name}-keys.txt"
    keys.write_text(f"{VIP} vip priority\n{PLAIN} plain\n")
    # A short flex timeout, so that one flex request waiting behind a batch runs out of it.
    with running_server(
        data_dir, BATCHD_KEYS_FILE=str(keys), BATCHD_FLEX_TIMEOUT_SECONDS="1.5"
    ) as srv:
        yield srv


def client(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_base_url, api_key=key, max_retries=0)


def test_each_tier_is_served_and_echoed(tiered: ServerProcess) -> None:
    vip, plain = client(tiered, VIP), client(tiered, PLAIN)
    for api, asked, served in [
        (vip, "priority", "priority"),
        (plain, "priority", "default"),  # not allowed it: served, and said, at default
        (plain, "auto", "default"),
        (plain, "flex", "flex"),  # an idle engine: batch capacity is free at once
    ]:
        done = api.chat.completions.create(
            model="default", messages=MESSAGES, max_tokens=2, service_tier=asked
        )
        assert done.service_tier == served, asked
        assert done.choices[0].message.content is not None
    response = vip.responses.create(
        model="default", input="Say hi.", max_output_tokens=2, service_tier="priority"
    )
    assert response.service_tier == "priority"
    chunks = list(
        plain.chat.completions.create(
            model="default", messages=MESSAGES, max_tokens=2, service_tier="flex", stream=True
        )
    )
    assert {chunk.service_tier for chunk in chunks} == {"flex"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_an_unknown_tier_is_a_400_naming_the_field(tiered: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(tiered, PLAIN).chat.completions.create(
            model="default",
            messages=MESSAGES,
            max_tokens=2,
            service_tier="turbo",  # type: ignore[arg-type]
        )
    assert caught.value.body is not None
    assert caught.value.body["param"] == "service_tier"  # type: ignore[index]


def test_flex_waits_behind_batch_work_and_ends_cleanly_at_its_timeout(
    tiered: ServerProcess,
) -> None:
    api = client(tiered, PLAIN)
    lines = [
        chat_line(f"r{i}", f"Write an essay about topic {i}.", max_tokens=64) for i in range(200)
    ]
    batch = api.batches.create(
        input_file_id=upload(api, lines), endpoint="/v1/chat/completions", completion_window="24h"
    )

    def batch_running() -> bool:
        counts = api.batches.retrieve(batch.id).request_counts
        return counts is not None and counts.completed > 0

    eventually(batch_running, "the batch started")
    with pytest.raises(openai.RateLimitError) as caught:
        api.chat.completions.create(
            model="default", messages=MESSAGES, max_tokens=2, service_tier="flex"
        )
    assert caught.value.code == "resource_unavailable"
    assert "1.5 s" in caught.value.message
    # A default request goes ahead of the batch and the server keeps serving.
    done = api.chat.completions.create(model="default", messages=MESSAGES, max_tokens=2)
    assert done.service_tier == "default"
    api.batches.cancel(batch.id)
    metrics = httpx.get(
        f"{tiered.url}/metrics", headers={"authorization": f"Bearer {PLAIN}"}, timeout=30
    ).text
    assert 'batchd_realtime_requests_total{outcome="flex_timeout",tier="flex"} 1.0' in metrics
    assert 'batchd_realtime_requests_total{outcome="answered",tier="priority"}' in metrics
    assert 'batchd_realtime_answer_seconds_count{tier="flex"}' in metrics
