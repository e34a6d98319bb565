"""Anthropic wire models: the Messages body we execute, the objects we return.

Fields follow Anthropic's API reference (see docs/compatibility.md). ``MessageCreateRequest``
converts itself to an engine request (``to_generation``); response builders take engine
results. Our extensions are marked ``# batchd extension``.

Error messages name the offending field the way Anthropic does (``messages.0.content.1: ...``):
the Anthropic error body has no ``param`` key, so the path has to live in the message.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from batchd import ids
from batchd.engines.base import (
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    Priority,
    SamplingParams,
)
from batchd.errors import InvalidRequest

MESSAGES_ENDPOINT = "/v1/messages"
COMPLETION_WINDOW = "24h"
BATCH_WINDOW_SECONDS = 24 * 3600
CUSTOM_ID_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")

# Internal BatchStatus values -> processing_status. Finalizing is still "in_progress" to a
# client: results are not readable until the batch has ended.
PROCESSING_STATUS = {
    "validating": "in_progress",
    "in_progress": "in_progress",
    "finalizing": "in_progress",
    "cancelling": "canceling",
    "completed": "ended",
    "failed": "ended",
    "expired": "ended",
    "cancelled": "ended",
}

# Features of the Messages API this server cannot honour. Each is refused by name (rather
# than ignored) so a request never silently runs without something its author relied on.
_UNSUPPORTED_FIELDS = ("container", "context_management", "mcp_servers", "diagnostics")
_TEXT_BLOCK_KEYS = frozenset({"type", "text", "cache_control", "citations"})
# Merged turns and multiple text blocks are joined by a blank line: the text-only chat
# template has no notion of blocks, and gluing "...end." to "Question:" changes the prompt.
_BLOCK_SEPARATOR = "\n\n"
# Anthropic allows at most this many cache_control breakpoints in one request.
MAX_CACHE_BREAKPOINTS = 4


# Tags pydantic adds to an error's location for the member of a union that failed.
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list[any]", "dict[str,any]"})


def _path(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc if part not in _UNION_TAGS)


def _invalid(path: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{path}: {message}" if path else message, param=path or None)


class _Strict(BaseModel):
    # Anthropic refuses unknown fields ("Extra inputs are not permitted") and does not coerce
    # "8" into 8; mirroring that keeps a request that works here working upstream.
    model_config = ConfigDict(extra="forbid", strict=True)


class MessageParam(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[Any]


class MetadataParam(_Strict):
    user_id: str | None = Field(default=None, max_length=256)


class MessageCreateRequest(_Strict):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int = Field(ge=1)
    messages: list[MessageParam] = Field(min_length=1, max_length=100_000)
    system: str | list[Any] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0, lt=2**31)
    stop_sequences: list[str] | None = None
    metadata: MetadataParam | None = None
    stream: bool | None = None
    # A breakpoint on the last block (Anthropic's automatic caching): it decides what usage
    # counts as cache reads and writes, as block-level ones do (``usage_dict``). The engine
    # shares prefixes whether marked or not. There is one service tier, and inference runs
    # where this server runs.
    cache_control: dict[str, Any] | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    inference_geo: str | None = None
    # Checked in ``parse_params`` (only some values can be honoured).
    tools: list[Any] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    speed: Literal["standard", "fast"] | None = None

    def _refuse_unsupported(self) -> None:
        if self.tools:
            raise _invalid("tools", "tool use is not supported by this server.")
        if self.tool_choice and self.tool_choice.get("type") not in ("auto", "none"):
            raise _invalid("tool_choice", "tool use is not supported by this server.")
        if self.thinking and self.thinking.get("type") != "disabled":
            raise _invalid("thinking", "extended thinking is not supported by this server.")
        if self.output_config and self.output_config.get("format") is not None:
            raise _invalid(
                "output_config.format", "structured outputs are not supported by this server."
            )
        if self.speed == "fast":
            raise _invalid("speed", "'fast' is not supported by this server.")

    def to_generation(self, priority: Priority = Priority.BATCH) -> GenerationRequest:
        # Each turn as its blocks: (text, whether the block carries cache_control).
        turns: list[tuple[str, list[tuple[str, bool]]]] = []
        if self.system:
            system = _blocks(self.system, "system")
            if "".join(text for text, _ in system):
                turns.append(("system", system))
        for index, message in enumerate(self.messages):
            blocks = _blocks(message.content, f"messages.{index}.content")
            if turns and turns[-1][0] == message.role:
                turns[-1][1].extend(blocks)  # Anthropic merges consecutive same-role turns
            else:
                turns.append((message.role, blocks))
        if turns and turns[-1][0] == "assistant" and not "".join(t for t, _ in turns[-1][1]):
            turns.pop()  # an empty prefill asks for nothing
        if self.cache_control is not None and turns:
            text, _ = turns[-1][1][-1]
            turns[-1][1][-1] = (text, True)  # automatic caching: a breakpoint on the last block
        # A final assistant turn is a prefill: Anthropic continues that text. The chat template
        # can only close it and open a new assistant turn, so the reply follows the prefill
        # rather than extending it mid-sentence (a known limitation of the template path).
        messages: list[ChatMessage] = []
        prefixes: list[tuple[ChatMessage, ...]] = []
        for role, blocks in turns:
            for end, (_, marked) in enumerate(blocks):
                if marked:
                    upto = _BLOCK_SEPARATOR.join(t for t, _ in blocks[: end + 1])
                    prefixes.append((*messages, ChatMessage(role=role, content=upto)))
            content = _BLOCK_SEPARATOR.join(t for t, _ in blocks)
            messages.append(ChatMessage(role=role, content=content))
        stop = tuple(s for s in self.stop_sequences or () if s)
        return GenerationRequest(
            model=self.model,
            params=SamplingParams(
                max_tokens=self.max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=self.top_k or 0,
                stop=stop,
            ),
            messages=tuple(messages),
            priority=priority,
            cache_prefixes=tuple(prefixes),
        )

    def _check_cache_breakpoints(self) -> None:
        """At most ``MAX_CACHE_BREAKPOINTS`` blocks (and the request) carry cache_control, as
        Anthropic allows; each an object."""
        marked: list[str] = []
        if self.cache_control is not None:
            marked.append("cache_control")
        sources: list[tuple[str, Any]] = [("system", self.system)]
        sources += [(f"messages.{i}.content", m.content) for i, m in enumerate(self.messages)]
        for path, content in sources:
            if not isinstance(content, list):
                continue
            for index, block in enumerate(content):
                if isinstance(block, dict) and block.get("cache_control") is not None:
                    where = f"{path}.{index}.cache_control"
                    if not isinstance(block["cache_control"], dict):
                        raise _invalid(where, "Input should be a valid dictionary")
                    marked.append(where)
        if len(marked) > MAX_CACHE_BREAKPOINTS:
            raise _invalid(
                marked[MAX_CACHE_BREAKPOINTS],
                f"A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control may be "
                f"provided. Found {len(marked)}.",
            )


def _text(content: str | list[Any], path: str) -> str:
    """The text of a string or a list of text blocks; any other block is refused by name."""
    return _BLOCK_SEPARATOR.join(text for text, _ in _blocks(content, path))


def _blocks(content: str | list[Any], path: str) -> list[tuple[str, bool]]:
    """The text blocks of a string or a list of them, each with whether it carries
    cache_control; any other block is refused by name."""
    if isinstance(content, str):
        return [(content, False)]
    pieces: list[tuple[str, bool]] = []
    for index, block in enumerate(content):
        where = f"{path}.{index}"
        kind = block.get("type") if isinstance(block, dict) else None
        if not isinstance(kind, str):
            raise _invalid(f"{where}.type", "Field required")
        if kind != "text":
            raise _invalid(
                where,
                f"content blocks of type '{kind[:64]}' are not supported by this server; "
                "only 'text' blocks are.",
            )
        text = block.get("text")
        if not isinstance(text, str):
            raise _invalid(f"{where}.text", "Input should be a valid string")
        extra = sorted(set(block) - _TEXT_BLOCK_KEYS)
        if extra:
            raise _invalid(f"{where}.{extra[0][:64]}", "Extra inputs are not permitted")
        pieces.append((text, block.get("cache_control") is not None))
    return pieces or [("", False)]  # an empty list is an empty text, as a string would be


def parse_params(body: Any, *, in_batch: bool) -> MessageCreateRequest:
    """Validate a Messages body (a batch request's ``params`` or a realtime body), including
    every content block, so that conversion cannot fail later; raise InvalidRequest naming
    the field."""
    if not isinstance(body, dict):
        raise _invalid("", "The request body must be a JSON object.")
    for name in _UNSUPPORTED_FIELDS:
        if body.get(name) is not None:
            raise _invalid(name, "this feature is not supported by this server.")
    try:
        parsed = MessageCreateRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise _invalid(_path(first["loc"]), first["msg"]) from None
    if in_batch and parsed.stream:
        raise _invalid("stream", "streaming is not supported inside a batch.")
    parsed._refuse_unsupported()
    parsed._check_cache_breakpoints()
    parsed.to_generation()  # checks every content block now, not when it is executed
    return parsed


# ---------------------------------------------------------------- responses


def stop_reason(result: GenerationResult) -> str:
    if result.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if result.stop_sequence is not None else "end_turn"


def output_tokens(result: GenerationResult) -> int:
    # The engine does not count the end-of-turn token that stopped it; Anthropic does (so
    # output_tokens is never 0). It was generated, and max_tokens still bounds the total.
    return result.completion_tokens + (1 if stop_reason(result) == "end_turn" else 0)


def cache_usage(result: GenerationResult) -> tuple[int, int, int]:
    """``(input_tokens, cache_creation_input_tokens, cache_read_input_tokens)`` by Anthropic's
    rule: only prefixes the request marked with ``cache_control`` count. The prompt up to the
    last breakpoint is cache traffic, the rest plain input; of that, a read is the longest
    marked prefix the engine found already computed (its shared-prefix tokens reach the
    breakpoint), and the remainder up to the last breakpoint a write. Prefix sharing the
    request did not mark is not a cache read here (OpenAI's ``cached_tokens`` and the
    ``batchd_engine_cached_prompt_tokens`` metric show it)."""
    prompt = result.prompt_tokens
    marks = sorted(n for n in result.cache_prefix_tokens if 0 < n <= prompt)
    if not marks:
        return prompt, 0, 0
    read = max((n for n in marks if n <= result.cached_tokens), default=0)
    return prompt - marks[-1], marks[-1] - read, read


def usage_dict(result: GenerationResult, service_tier: str) -> dict[str, Any]:
    uncached, created, read = cache_usage(result)
    return {
        "input_tokens": uncached,  # after the last cache breakpoint
        "output_tokens": output_tokens(result),
        "cache_creation_input_tokens": created,
        "cache_read_input_tokens": read,
        "cache_creation": {"ephemeral_5m_input_tokens": created, "ephemeral_1h_input_tokens": 0},
        "server_tool_use": None,
        "service_tier": service_tier,
    }


def message_body(
    model: str, result: GenerationResult, *, service_tier: str, message_id: str | None = None
) -> dict[str, Any]:
    return {
        "id": message_id or ids.message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": result.text}] if result.text else [],
        "stop_reason": stop_reason(result),
        "stop_sequence": result.stop_sequence,
        "usage": usage_dict(result, service_tier),
    }


def error_body(error_type: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": request_id,
    }


# ------------------------------------------------------------- batch objects


def timestamp(seconds: int | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def processing_status(status: str) -> str:
    return PROCESSING_STATUS[status]


def message_batch_object(record: Any, base_url: str) -> dict[str, Any]:
    status = processing_status(record.status.value)
    counts = record.counts
    ended_at = record.ended_at
    ended = status == "ended"
    return {
        "id": record.id,
        "type": "message_batch",
        "processing_status": status,
        # batchd extension (in behaviour, not shape): the outcome counts move as requests
        # finish, where Anthropic keeps them at 0 until the whole batch has ended.
        "request_counts": {
            "processing": counts.pending + counts.running,
            "succeeded": counts.succeeded,
            "errored": counts.errored,
            "canceled": counts.canceled,
            "expired": counts.expired,
        },
        "ended_at": timestamp(ended_at) if ended else None,
        "created_at": timestamp(record.created_at),
        "expires_at": timestamp(record.expires_at),
        "archived_at": timestamp(record.archived_at),
        "cancel_initiated_at": timestamp(record.cancelling_at),
        "results_url": (
            f"{base_url.rstrip('/')}/v1/messages/batches/{record.id}/results"
            if ended and record.archived_at is None
            else None
        ),
    }


def list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def deleted_object(batch_id: str) -> dict[str, Any]:
    return {"id": batch_id, "type": "message_batch_deleted"}


# Results lines are spliced from stored JSON rather than parsed and re-serialized: the
# stored message or error body is already exactly what the line must carry.
_NOT_EXECUTED = {
    "canceled": b'{"type":"canceled"}',
    "expired": b'{"type":"expired"}',
}


def result_line(custom_id: str, state: str, stored: bytes | None) -> bytes:
    """One line of the results file for a row in a final ``state``."""
    head = b'{"custom_id":' + orjson.dumps(custom_id) + b',"result":'
    if state == "succeeded":
        result = b'{"type":"succeeded","message":' + (stored or b"{}") + b"}"
    elif state == "errored":
        error = stored or orjson.dumps(error_body("api_error", "The request failed."))
        result = b'{"type":"errored","error":' + error + b"}"
    else:
        result = _NOT_EXECUTED[state]
    return head + result + b"}\n"
