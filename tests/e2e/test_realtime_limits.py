"""Realtime limits below what batch lines may use, through both SDKs: realtime requests asking
for more output, or a longer context, than the server allows them get a 400 naming the field
in their surface's shape; the same bodies in a batch run."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import openai
import pytest

from tests.support.helpers import API_KEY, chat_line, read_jsonl, upload, wait_for
from tests.support.serverproc import ServerProcess, running_server

LIMIT = 8
CONTEXT = 64  # realtime prompt + completion, in tokens
LONG = "Repeat these words: " + " ".join(["apple"] * 60)  # ~80 tokens with the template
MESSAGES = [{"role": "user", "content": "Count from 1 to 30."}]


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(
        tmp_path_factory.mktemp("limits"),
        BATCHD_API_KEYS=API_KEY,
        BATCHD_REALTIME_MAX_TOKENS=str(LIMIT),
        BATCHD_REALTIME_MAX_CONTEXT_TOKENS=str(CONTEXT),
    ) as srv:
        yield srv


def test_realtime_requests_over_the_limit_are_refused_naming_the_field(
    limited: ServerProcess,
) -> None:
    api = openai.OpenAI(base_url=limited.openai_base_url, api_key=API_KEY, max_retries=0)
    for ask in ({"max_tokens": LIMIT + 1}, {"max_completion_tokens": LIMIT + 1}):
        with pytest.raises(openai.BadRequestError) as caught:
            api.chat.completions.create(model="default", messages=MESSAGES, **ask)  # type: ignore[call-overload]
        assert caught.value.body["param"] == next(iter(ask))  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        api.responses.create(model="default", input="Hi", max_output_tokens=LIMIT + 1)
    assert refused.value.body["param"] == "max_output_tokens"  # type: ignore[index]
    claude = anthropic.Anthropic(base_url=limited.url, api_key=API_KEY, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as caught_message:
        claude.messages.create(model="default", max_tokens=LIMIT + 1, messages=MESSAGES)  # type: ignore[arg-type]
    assert caught_message.value.body["type"] == "error"  # type: ignore[index]
    assert "max_tokens" in caught_message.value.message
    # At the limit, served; the server goes on serving after the refusals.
    done = api.chat.completions.create(model="default", messages=MESSAGES, max_tokens=LIMIT)
    assert done.usage is not None and done.usage.completion_tokens <= LIMIT


def test_a_batch_line_may_ask_for_more_than_the_realtime_limit(limited: ServerProcess) -> None:
    api = openai.OpenAI(base_url=limited.openai_base_url, api_key=API_KEY, max_retries=0)
    file_id = upload(api, [chat_line("long", "Count from 1 to 30.", max_tokens=4 * LIMIT)])
    batch = api.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_for(api, batch.id)
    assert done.status == "completed"
    [row] = read_jsonl(api, done.output_file_id)
    body = row["response"]["body"]
    assert row["response"]["status_code"] == 200
    assert body["usage"]["completion_tokens"] > LIMIT


def test_a_realtime_context_limit_refuses_a_long_prompt_that_a_batch_line_may_send(
    limited: ServerProcess,
) -> None:
    api = openai.OpenAI(base_url=limited.openai_base_url, api_key=API_KEY, max_retries=0)
    long_messages = [{"role": "user", "content": LONG}]
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model="default", messages=long_messages, max_tokens=2)  # type: ignore[arg-type]
    assert caught.value.code == "context_length_exceeded"
    assert "realtime requests (batches may use the model's" in caught.value.message
    assert f"is {CONTEXT} tokens" in caught.value.message
    claude = anthropic.Anthropic(base_url=limited.url, api_key=API_KEY, max_retries=0)
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="default", max_tokens=2, messages=long_messages)  # type: ignore[arg-type]
    file_id = upload(api, [chat_line("long", LONG, max_tokens=2)])
    batch = api.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_for(api, batch.id)
    [row] = read_jsonl(api, done.output_file_id)
    assert row["response"]["status_code"] == 200
    assert row["response"]["body"]["usage"]["prompt_tokens"] > CONTEXT
