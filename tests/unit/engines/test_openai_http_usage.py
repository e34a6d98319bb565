"""The token counts read from an upstream's answers: chat and completion ``usage``, the
Responses API's (``input_tokens``...), whole bodies and streams cut anywhere."""

from __future__ import annotations

import orjson

from batchd.engines.openai_http.bodies import response_usage, usage_counts
from batchd.engines.openai_http.sse import StreamUsage


def test_chat_and_responses_usage_give_the_same_counts() -> None:
    chat = {
        "prompt_tokens": 9,
        "completion_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 3},
    }
    responses = {
        "input_tokens": 9,
        "output_tokens": 4,
        "input_tokens_details": {"cached_tokens": 3},
        "total_tokens": 13,
    }
    assert usage_counts(chat) == usage_counts(responses) == (9, 4, 3)
    assert response_usage(orjson.dumps({"usage": responses})) == (9, 4, 3)


def test_missing_or_malformed_usage_counts_nothing() -> None:
    assert usage_counts(None) == (0, 0, 0)
    assert usage_counts({"input_tokens": "many"}) == (0, 0, 0)
    assert usage_counts({"prompt_tokens": 2, "prompt_tokens_details": "x"}) == (2, 0, 0)
    assert response_usage(b"not json") == (0, 0, 0)
    assert response_usage(b"[1, 2]") == (0, 0, 0)


def test_a_responses_stream_reports_its_usage_in_response_completed() -> None:
    created = {"type": "response.created", "response": {"id": "resp_1", "usage": None}}
    done = {
        "type": "response.completed",
        "response": {"id": "resp_1", "usage": {"input_tokens": 11, "output_tokens": 5}},
    }
    stream = b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n"
        for e in (created, done)
    )
    usage = StreamUsage()
    for at in range(0, len(stream), 7):  # chunks cut anywhere
        usage.feed(stream[at : at + 7])
    assert usage.found and (usage.prompt, usage.completion) == (11, 5)


def test_a_chat_stream_reports_its_usage_in_the_last_chunk() -> None:
    usage = StreamUsage()
    usage.feed(b'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}\n')
    usage.feed(b"data: [DONE]\n")
    assert usage.found and (usage.prompt, usage.completion) == (4, 2)
