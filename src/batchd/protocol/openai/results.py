"""The OpenAI bodies we answer with: chat.completion, text_completion and error bodies, built
from engine results."""

from __future__ import annotations

import time
from typing import Any

from batchd import ids
from batchd.engines.base import GenerationResult
from batchd.protocol.openai.bodies import SYSTEM_FINGERPRINT


def usage_dict(result: GenerationResult) -> dict[str, Any]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def chat_completion_body(
    model: str, result: GenerationResult, service_tier: str = "default"
) -> dict[str, Any]:
    return {
        "id": ids.chat_completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": result.text,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": usage_dict(result),
        "service_tier": service_tier,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def completion_body(model: str, result: GenerationResult) -> dict[str, Any]:
    return {
        "id": ids.completion_id(),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "text": result.text,
                "index": 0,
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": usage_dict(result),
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def response_body(
    endpoint: str, model: str, result: GenerationResult, service_tier: str = "default"
) -> dict[str, Any]:
    if endpoint == "/v1/chat/completions":
        return chat_completion_body(model, result, service_tier)
    return completion_body(model, result)


def error_body(
    message: str, *, type_: str = "invalid_request_error", param: str | None, code: str | None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
