"""Honest fields, over HTTP with the official SDKs against the real engine: responses and the
batch object name the served model (not the alias asked for), Anthropic responses carry
``request-id``, and Anthropic's cache token counts follow ``cache_control`` while OpenAI's
``cached_tokens`` still shows the engine's own prefix sharing."""

from __future__ import annotations

import time
from typing import Any

import anthropic
import httpx
import openai

from batchd.engines.llamacpp.model_files import BUNDLED_MODEL_ID
from tests.support.helpers import API_KEY, chat_line, read_jsonl, upload, wait_for
from tests.support.serverproc import ServerProcess

# Long enough to be worth sharing (batchd shares prefixes of 16 tokens or more).
RULES = " ".join(f"Rule {i}: answer in one short sentence about topic {i}." for i in range(12))


def claude_for(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0)


def test_responses_and_batches_name_the_served_model(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert reply.model == BUNDLED_MODEL_ID
    chunks = list(
        client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=2,
            stream=True,
        )
    )
    assert chunks and {c.model for c in chunks} == {BUNDLED_MODEL_ID}
    text = client.completions.create(model="default", prompt="Hi", max_tokens=2)
    assert text.model == BUNDLED_MODEL_ID

    lines = [chat_line("a", "Hi", max_tokens=2), chat_line("b", "Yo", max_tokens=2)]
    lines.append(chat_line("c", "Hey", max_tokens=2, model=BUNDLED_MODEL_ID))
    batch = client.batches.create(
        input_file_id=upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = wait_for(client, batch.id)
    assert done.status == "completed" and done.model == BUNDLED_MODEL_ID
    bodies = [row["response"]["body"] for row in read_jsonl(client, done.output_file_id)]
    assert [b["model"] for b in bodies] == [BUNDLED_MODEL_ID] * 3


def test_anthropic_responses_carry_request_id(server: ServerProcess) -> None:
    claude = claude_for(server)
    messages: Any = [{"role": "user", "content": "Hi"}]
    raw = claude.messages.with_raw_response.create(model="default", max_tokens=2, messages=messages)
    message = raw.parse()
    assert message.model == BUNDLED_MODEL_ID
    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["request-id"] == raw.headers["x-request-id"]
    assert message._request_id == raw.headers["request-id"]

    created = claude.messages.batches.create(
        requests=[
            {
                "custom_id": "a",
                "params": {"model": "default", "max_tokens": 2, "messages": messages},
            }
        ]
    )
    assert created._request_id and created._request_id.startswith("req_")
    # Polls take the fast path (api/poll_fast_path.py): it sends the header too.
    polled = claude.messages.batches.retrieve(created.id)
    assert polled._request_id and polled._request_id.startswith("req_")
    listed = httpx.get(
        f"{server.url}/v1/messages/batches", headers={"x-api-key": API_KEY}, timeout=30
    )
    assert listed.headers["request-id"] == listed.headers["x-request-id"]

    # An error's request-id is its body's request_id.
    missing = httpx.get(
        f"{server.url}/v1/messages/batches/msgbatch_nope",
        headers={"x-api-key": API_KEY},
        timeout=30,
    )
    assert missing.status_code == 404
    assert missing.headers["request-id"] == missing.json()["request_id"]
    # The OpenAI surface has no such header (OpenAI sends x-request-id only).
    assert (
        "request-id"
        not in httpx.get(
            f"{server.url}/v1/batches", headers={"authorization": f"Bearer {API_KEY}"}, timeout=30
        ).headers
    )


def _message_batch_usages(claude: anthropic.Anthropic, requests: list[Any]) -> dict[str, Any]:
    batch = claude.messages.batches.create(requests=requests)
    deadline = time.monotonic() + 300
    while claude.messages.batches.retrieve(batch.id).processing_status != "ended":
        assert time.monotonic() < deadline, "the message batch did not end"
        time.sleep(0.3)
    usages = {}
    for result in claude.messages.batches.results(batch.id):
        assert result.result.type == "succeeded", result
        usages[result.custom_id] = result.result.message.usage
    return usages


def test_anthropic_cache_tokens_count_only_marked_prefixes(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    claude = claude_for(server)

    def ask(custom_id: str, question: str, *, mark: bool) -> dict[str, Any]:
        system: dict[str, Any] = {"type": "text", "text": RULES}
        if mark:
            system["cache_control"] = {"type": "ephemeral"}
        params = {
            "model": "default",
            "max_tokens": 2,
            "temperature": 0,
            "system": [system],
            "messages": [{"role": "user", "content": question}],
        }
        return {"custom_id": custom_id, "params": params}

    questions = [f"Question {i}: what is {i} plus {i}?" for i in range(4)]
    marked = _message_batch_usages(
        claude, [ask(f"m{i}", q, mark=True) for i, q in enumerate(questions)]
    )
    # The marked prefix (the system prompt) is cache traffic: written by the request that
    # computed it, read by those that shared it; the same length for every request.
    cached = {u.cache_creation_input_tokens + u.cache_read_input_tokens for u in marked.values()}
    assert len(cached) == 1 and cached.pop() > 16, marked
    for usage in marked.values():
        assert usage.input_tokens >= 1, usage  # the question, after the breakpoint
        assert 0 in (usage.cache_creation_input_tokens, usage.cache_read_input_tokens), usage
        assert usage.cache_creation is not None
        assert usage.cache_creation.ephemeral_5m_input_tokens == usage.cache_creation_input_tokens
    assert any(u.cache_read_input_tokens for u in marked.values()), "nothing was shared"
    assert any(u.cache_creation_input_tokens for u in marked.values()), "nothing was written"

    # Unmarked, the same prompts: the engine shares the prefix all the same, but that is no
    # cache read on the Anthropic surface. The token total is the same.
    plain = _message_batch_usages(
        claude, [ask(f"p{i}", q, mark=False) for i, q in enumerate(questions)]
    )
    for i in range(len(questions)):
        usage, twin = plain[f"p{i}"], marked[f"m{i}"]
        assert (usage.cache_creation_input_tokens, usage.cache_read_input_tokens) == (0, 0)
        assert usage.input_tokens == (
            twin.input_tokens + twin.cache_creation_input_tokens + twin.cache_read_input_tokens
        )

    # OpenAI's cached_tokens still shows the engine's sharing, marked or not.
    lines = [chat_line(f"o{i}", q, max_tokens=2) for i, q in enumerate(questions)]
    for line in lines:
        line["body"]["messages"].insert(0, {"role": "system", "content": RULES})
    batch = wait_for(
        client,
        client.batches.create(
            input_file_id=upload(client, lines),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        ).id,
    )
    assert batch.status == "completed"
    shared = [
        row["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"]
        for row in read_jsonl(client, batch.output_file_id)
    ]
    assert any(shared), shared
