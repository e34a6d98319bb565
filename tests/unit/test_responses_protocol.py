"""The Responses API body (protocol/openai/responses.py): what it accepts, how it becomes a
generation request, what it refuses (naming the field), and the response object it answers
with, checked against the installed SDK's own types."""

from __future__ import annotations

from typing import Any

import pytest
from openai.types.responses import Response

from batchd.engines.base import GenerationResult, Priority
from batchd.errors import InvalidRequest
from batchd.protocol.openai import responses as r

BODY: dict[str, Any] = {"model": "default", "input": "Say hi."}


def refused(body: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as excinfo:
        r.parse_request(body).to_generation()
    return excinfo.value


def test_a_string_input_with_instructions_is_a_system_and_a_user_message() -> None:
    body = {**BODY, "instructions": "Be brief.", "max_output_tokens": 5, "temperature": 0}
    generation = r.parse_request(body).to_generation(Priority.REALTIME)
    assert [(m.role, m.content) for m in generation.messages or ()] == [
        ("system", "Be brief."),
        ("user", "Say hi."),
    ]
    assert (generation.params.max_tokens, generation.params.temperature) == (5, 0)
    assert generation.priority is Priority.REALTIME


def test_message_items_with_text_parts_become_chat_messages() -> None:
    body = {
        "model": "default",
        "input": [
            {"role": "developer", "content": "Rules."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "b"}]},
            {"role": "user", "content": "c"},
        ],
        "top_p": 0.5,
    }
    generation = r.parse_request(body).to_generation()
    assert [(m.role, m.content) for m in generation.messages or ()] == [
        ("system", "Rules."),
        ("user", "a"),
        ("assistant", "b"),
        ("user", "c"),
    ]
    assert generation.params.top_p == 0.5


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "name": "f"}]}, "tools"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"background": True}, "background"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"text": {"format": {"type": "json_object"}}}, "text.format"),
        ({"truncation": "auto"}, "truncation"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"input": []}, "input"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input[0].content[0]",
        ),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"api_key": "sk-1"}, "api_key"),
    ],
)
def test_what_cannot_be_honoured_is_refused_naming_the_field(
    extra: dict[str, Any], param: str
) -> None:
    assert refused({**BODY, **extra}).param == param


def test_empty_or_neutral_values_of_refused_fields_are_accepted() -> None:
    body = {
        **BODY,
        "tools": [],
        "previous_response_id": None,
        "background": False,
        "tool_choice": "auto",
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "store": True,
        "metadata": {"k": "v"},
        "parallel_tool_calls": True,
    }
    assert r.parse_request(body).to_generation().messages


def test_a_missing_model_or_input_is_named() -> None:
    assert refused({"input": "x"}).param == "model"
    assert refused({"model": "default"}).param == "input"


@pytest.mark.parametrize(
    ("finish", "status", "reason"),
    [("stop", "completed", None), ("length", "incomplete", "max_output_tokens")],
)
def test_the_response_object_parses_with_the_sdk(
    finish: Any, status: str, reason: str | None
) -> None:
    parsed = r.parse_request({**BODY, "instructions": "Be brief.", "metadata": {"k": "v"}})
    result = GenerationResult(
        "Hi there", finish, prompt_tokens=7, completion_tokens=2, cached_tokens=3
    )
    response = Response.model_validate(r.response_body(parsed, "served-model", result))
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.model == "served-model"
    assert response.status == status
    assert (response.incomplete_details.reason if response.incomplete_details else None) == reason
    assert response.output_text == "Hi there"
    assert response.instructions == "Be brief." and response.metadata == {"k": "v"}
    usage = response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (7, 2, 9)
    assert usage.input_tokens_details.cached_tokens == 3
    assert usage.output_tokens_details.reasoning_tokens == 0
