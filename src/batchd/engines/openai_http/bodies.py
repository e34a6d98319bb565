"""OpenAI request and response bodies for the openai-http engine: a ``GenerationRequest``
(the Anthropic surfaces) as a chat or completions body, an answer back as a
``GenerationResult``, the ``usage`` of a response, and the token estimate charged before
sending."""

from __future__ import annotations

import math
from typing import Any

import orjson

from batchd.engines.base import (
    FinishReason,
    ForwardResponse,
    GenerationRequest,
    GenerationResult,
)
from batchd.errors import EngineError

# Characters per token of the estimate charged before sending; see upstream.py.
CHARS_PER_TOKEN = 4


def request_body(
    request: GenerationRequest, model: str, *, stream: bool
) -> tuple[str, dict[str, Any]]:
    """The endpoint and body to send for ``request`` (``model``: the served id)."""
    params = request.params
    body: dict[str, Any] = {"model": model}
    if request.messages is not None:
        endpoint = "/v1/chat/completions"
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    else:
        endpoint = "/v1/completions"
        body["prompt"] = request.prompt or ""
    if params.max_tokens is not None:
        body["max_tokens"] = params.max_tokens
    body["temperature"] = params.temperature
    if params.top_p != 1.0:
        body["top_p"] = params.top_p
    if params.top_k:
        body["top_k"] = params.top_k  # vLLM/SGLang/llama.cpp extension; OpenAI refuses it
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = list(params.stop)
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return endpoint, body


def answer_result(response: ForwardResponse, stop: tuple[str, ...]) -> GenerationResult:
    """A chat or completions answer (a 2xx) as a ``GenerationResult``; ``stop``: the
    request's stop strings, the only ones reported as the one that ended it."""
    try:
        answer = orjson.loads(response.body)
        choice = answer["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        raise EngineError("The upstream answered with a body that is not a completion.") from None
    stop_sequence = choice.get("stop_reason")
    return GenerationResult(
        text=text or "",
        finish_reason=finish_reason(choice.get("finish_reason")),
        prompt_tokens=response.prompt_tokens,
        completion_tokens=response.completion_tokens,
        cached_tokens=response.cached_tokens,
        stop_sequence=stop_sequence if stop_sequence in stop else None,
        attempts=response.attempts,
    )


def stream_result(
    pieces: list[str],
    finish: str | None,
    usage: dict[str, Any],
    body: dict[str, Any],
    attempts: int,
) -> GenerationResult:
    """The result of a streamed answer, from its text pieces and the events' last fields."""
    return GenerationResult(
        text="".join(pieces),
        finish_reason=finish_reason(finish),
        # An upstream that does not report usage in streams (stream_options is not
        # universal) gets the same estimate the limiter used, and one token a chunk.
        prompt_tokens=int(usage.get("prompt_tokens") or estimate_prompt_tokens(body)),
        completion_tokens=int(usage.get("completion_tokens") or len(pieces)),
        attempts=attempts,
    )


def response_usage(body: bytes) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens from an OpenAI response body, 0s if absent."""
    try:
        return usage_counts(orjson.loads(body).get("usage"))
    except (orjson.JSONDecodeError, AttributeError):
        return 0, 0, 0


def usage_counts(usage: Any) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens of a ``usage`` object, in the chat and completion
    shape (``prompt_tokens``...) or the Responses API's (``input_tokens``...); 0s if absent."""
    if not isinstance(usage, dict):
        return 0, 0, 0
    try:
        prompt = int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0)
        completion = int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    except (TypeError, ValueError):
        return 0, 0, 0
    return prompt, completion, cached


def token_estimate(
    payload: bytes, endpoint: str, body: dict[str, Any], default_completion: int
) -> int:
    """What a request is charged before sending: its payload's characters / 4 plus the most
    it can generate (``max_tokens`` or the model's default, times ``n``)."""
    completion = 0
    if endpoint != "/v1/embeddings":
        wanted = body.get("max_completion_tokens") or body.get("max_tokens")
        completion = wanted if isinstance(wanted, int) and wanted > 0 else 0
        completion = completion or default_completion
        n = body.get("n")
        completion *= n if isinstance(n, int) and n > 1 else 1
    return math.ceil(len(payload) / CHARS_PER_TOKEN) + completion


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    return math.ceil(len(orjson.dumps(body.get("messages") or body.get("prompt"))) / 4)


def finish_reason(reason: object) -> FinishReason:
    return "length" if reason == "length" else "stop"
