"""The OpenAI Responses API (``POST /v1/responses``): the request body, its conversion to a
``GenerationRequest``, the ``response`` object we answer with and the stream's events.

Only what one stateless text generation can honour is accepted: ``input`` (a string or a list
of messages with text parts), ``instructions``, ``max_output_tokens``, ``temperature``,
``top_p``. Anything that needs stored state (``previous_response_id``, ``conversation``),
tools, reasoning, background runs or another output format is refused with a 400 naming the
field rather than silently ignored. Responses are not stored: ``store`` is accepted and
answered as ``false``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field, ValidationError

from batchd import ids
from batchd.engines.base import (
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    Priority,
    SamplingParams,
)
from batchd.errors import InvalidRequest
from batchd.protocol.openai.bodies import (
    INT64,
    _Body,
    _loc_to_param,
    join_text_parts,
    refuse_routing_fields,
    validated,
)

RESPONSES_ENDPOINT = "/v1/responses"

# Fields that ask for something this server does not do; refused whenever they carry a value
# (null, false, an empty list or object are the same as leaving them out).
_REFUSED: dict[str, str] = {
    "previous_response_id": "responses are not stored here, so there is no earlier response"
    " to continue; send the whole conversation in 'input'",
    "conversation": "conversations are not stored here; send the whole conversation in 'input'",
    "tools": "tools are not supported by this server",
    "reasoning": "reasoning options are not supported by this server",
    "background": "background responses are not supported by this server; use a batch",
    "prompt": "stored prompt templates are not supported by this server",
    "include": "extra output data ('include') is not supported by this server",
    "top_logprobs": "logprobs are not supported by this server",
    "context_management": "context management is not supported by this server",
    "moderation": "moderation is not supported by this server",
}
_TEXT_PART_TYPES = ("input_text", "output_text", "text")


class InputMessage(_Body):
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[dict[str, Any]]
    type: Literal["message"] | None = None

    def text(self, index: int) -> str:
        if isinstance(self.content, str):
            return self.content
        return join_text_parts(
            self.content, _TEXT_PART_TYPES, f"input[{index}].content", "input_text"
        )


class ResponsesRequest(_Body):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)

    def _refuse_unsupported(self) -> None:
        extra = self.model_extra or {}
        for name, why in _REFUSED.items():
            value = extra.get(name)
            if value not in (None, False, [], {}, 0):
                raise InvalidRequest(
                    f"'{name}' is not supported: {why}.", param=name, code="unsupported_parameter"
                )
        if self.tool_choice not in (None, "auto", "none"):
            raise InvalidRequest(
                "tool_choice may only be 'auto' or 'none': tools are not supported by this server.",
                param="tool_choice",
                code="unsupported_parameter",
            )
        text_format = (self.text or {}).get("format")
        if text_format is not None and (
            not isinstance(text_format, dict) or text_format.get("type") != "text"
        ):
            raise InvalidRequest(
                "Only text.format {'type': 'text'} is supported.",
                param="text.format",
                code="unsupported_parameter",
            )
        if self.truncation == "auto":
            raise InvalidRequest(
                "truncation 'auto' is not supported: an input longer than the model's context"
                " is refused, never truncated; send 'disabled' or leave it out.",
                param="truncation",
                code="unsupported_parameter",
            )

    def messages(self) -> tuple[ChatMessage, ...]:
        out: list[ChatMessage] = []
        if self.instructions:
            out.append(ChatMessage(role="system", content=self.instructions))
        if isinstance(self.input, str):
            out.append(ChatMessage(role="user", content=self.input))
            return tuple(out)
        if not self.input:
            raise InvalidRequest("'input' must not be an empty list.", param="input")
        for index, item in enumerate(self.input):
            kind = item.get("type", "message")
            if kind != "message":
                raise InvalidRequest(
                    f"Input items of type {str(kind)[:100]!r} are not supported by this server;"
                    " only messages are.",
                    param=f"input[{index}].type",
                )
            try:
                message = InputMessage.model_validate(item)
            except ValidationError as exc:
                first = exc.errors()[0]
                param = _loc_to_param((f"input[{index}]", *first["loc"]))
                raise InvalidRequest(f"Invalid '{param}': {first['msg']}.", param=param) from None
            role = "system" if message.role == "developer" else message.role
            out.append(ChatMessage(role=role, content=message.text(index)))
        return tuple(out)

    def to_generation(self, priority: Priority = Priority.BATCH) -> GenerationRequest:
        self._refuse_unsupported()
        return GenerationRequest(
            model=self.model,
            params=self._sampling(),
            messages=self.messages(),
            priority=priority,
        )

    def _sampling(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_output_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
        )


def parse_request(body: Any) -> ResponsesRequest:
    """Types and ranges of a Responses body, and no routing fields; raises InvalidRequest
    naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", param="body")
    refuse_routing_fields(body)
    return validated(ResponsesRequest, body)


# ------------------------------------------------------------------ answers


def usage_dict(result: GenerationResult) -> dict[str, Any]:
    return {
        "input_tokens": result.prompt_tokens,
        "input_tokens_details": {"cached_tokens": result.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": result.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def output_message(item_id: str, status: str, text: str | None) -> dict[str, Any]:
    """The assistant message item; ``text`` None: not started (no content part yet)."""
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [] if text is None else [output_text(text)],
    }


def _status(result: GenerationResult) -> tuple[str, dict[str, Any] | None]:
    if result.finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def response_object(
    parsed: ResponsesRequest,
    model: str,
    response_id: str,
    created_at: int,
    *,
    status: str = "in_progress",
    output: list[dict[str, Any]] | None = None,
    result: GenerationResult | None = None,
    service_tier: str = "default",
) -> dict[str, Any]:
    """A ``response`` object for ``model`` (the served model's id); with ``result``, the
    finished one (its status from the result)."""
    incomplete: dict[str, Any] | None = None
    if result is not None:
        status, incomplete = _status(result)
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "completed_at": int(time.time()) if result is not None else None,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": parsed.instructions,
        "max_output_tokens": parsed.max_output_tokens,
        "max_tool_calls": None,
        "model": model,
        "output": output or [],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": service_tier,
        "store": False,
        "temperature": 1.0 if parsed.temperature is None else parsed.temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": parsed.tool_choice or "auto",
        "tools": [],
        "top_logprobs": 0,
        "top_p": 1.0 if parsed.top_p is None else parsed.top_p,
        "truncation": "disabled",
        "usage": usage_dict(result) if result is not None else None,
        "user": parsed.user,
        "metadata": parsed.metadata or {},
    }


def response_body(
    parsed: ResponsesRequest, model: str, result: GenerationResult, service_tier: str = "default"
) -> dict[str, Any]:
    """The whole ``response`` for a finished generation (realtime or a batch line's body);
    ``model``: the served model's id, as chat completions report it."""
    status, _ = _status(result)
    message = output_message(ids.response_item_id(), status, result.text)
    return response_object(
        parsed,
        model,
        ids.response_id(),
        int(time.time()),
        output=[message],
        result=result,
        service_tier=service_tier,
    )
