"""Realtime OpenAI endpoints on the same engine, through the official SDK."""

from __future__ import annotations

import threading

import openai
import pytest

from tests.support.helpers import chat_line, upload, wait_for


def test_chat_completion(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    assert response.object == "chat.completion"
    assert response.choices[0].message.content
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage is not None and 1 <= response.usage.completion_tokens <= 8
    # The chat template's opening may come from the prefix cache (an earlier request left
    # it); the last prompt token is always computed.
    usage = response.usage
    assert 0 <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


def test_a_later_request_reuses_an_earlier_ones_prefix(client: openai.OpenAI) -> None:
    system = "You answer questions about a small bakery. " * 12  # ~100 tokens
    usages = []
    for question in ("Do you sell rye bread?", "Are you open on Mondays?"):
        response = client.chat.completions.create(
            model="default",
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=4,
            temperature=0,
        )
        assert response.usage is not None and response.usage.prompt_tokens_details is not None
        usages.append(response.usage)
    # The second ran after the first finished: the prefix cache served the system prompt.
    assert usages[1].prompt_tokens_details.cached_tokens >= 100
    assert usages[1].prompt_tokens_details.cached_tokens < usages[1].prompt_tokens


def test_chat_completion_streaming(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    whole = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=10,
        temperature=0,
    )
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_legacy_completion_and_errors(client: openai.OpenAI) -> None:
    response = client.completions.create(model="default", prompt="Once upon a time", max_tokens=6)
    assert response.object == "text_completion"
    assert response.usage.completion_tokens <= 6
    with pytest.raises(openai.NotFoundError) as excinfo:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert excinfo.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model="default", messages=[])
    assert excinfo.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "x"}], max_tokens=10**9
        )
    assert excinfo.value.body["code"] == "context_length_exceeded"
    models = [m.id for m in client.models.list()]
    assert "smollm2-135m-instruct" in models and "default" in models


def test_realtime_is_served_while_a_batch_runs(client: openai.OpenAI) -> None:
    lines = [
        chat_line(f"bg-{i}", f"Write an essay about river {i}.", max_tokens=64) for i in range(40)
    ]
    batch = client.batches.create(
        input_file_id=upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    wait_for(client, batch.id, ("in_progress",), timeout=60)
    answers: list[str] = []

    def ask() -> None:
        response = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
        )
        answers.append(response.choices[0].message.content or "")

    thread = threading.Thread(target=ask)
    thread.start()
    thread.join(timeout=60)
    assert answers, "the realtime request did not finish while the batch ran"
    assert client.batches.retrieve(batch.id).status == "in_progress", (
        "realtime waited for the batch"
    )
    batch = wait_for(client, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 40
