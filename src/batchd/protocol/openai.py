"""OpenAI wire models: request bodies we execute, objects we return.

Fields follow ../shared/spec/api-spec.md part A in the spec's order. Request models convert
themselves to engine requests (``to_generation``); response builders take engine results.
Our extensions are marked ``# batchd extension``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from batchd import ids
from batchd.engines.base import (
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    Priority,
    SamplingParams,
)
from batchd.errors import InvalidRequest

# /v1/embeddings runs only on engines that serve embeddings (upstream ones); a batch for it
# is refused at creation when no served model can answer it.
SUPPORTED_BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
EMBEDDINGS_ENDPOINT = "/v1/embeddings"
# Fields by which a client library or proxy lets a caller pick the server, the credentials or
# extra HTTP parts of a request. A body must never choose where it is sent or as whom: only
# the registry names upstreams. Refused wherever they appear at the top of a body.
ROUTING_FIELDS = (
    "api_base",
    "base_url",
    "api_key",
    "api_version",
    "api_type",
    "organization",
    "project",
    "headers",
    "default_headers",
    "extra_headers",
    "extra_query",
    "default_query",
    "extra_body",
    "http_client",
    "azure_endpoint",
    "azure_deployment",
    "azure_ad_token",
    "deployment_id",
    "custom_llm_provider",
    "proxy",
    "proxies",
    "endpoint",
    "upstream",
    "upstream_url",
)
KNOWN_BATCH_ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)
MAX_STOP_SEQUENCES = 4
# [REC] OpenAI documents no count; 1,024 biased tokens is beyond any real use and keeps a
# hostile body (a million entries) from costing more than a length check.
MAX_LOGIT_BIAS_ENTRIES = 1024
INT64 = 2**63
SYSTEM_FINGERPRINT = "fp_batchd"


class _Body(BaseModel):
    # Unknown fields are tolerated (clients send user, store, metadata...); fields we cannot
    # honour are refused explicitly below rather than silently ignored. Strict: a string where
    # a number belongs ("max_tokens": "8") is an error, as it is upstream, not a coercion.
    model_config = ConfigDict(extra="allow", strict=True)


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for part_index, part in enumerate(self.content):
            kind = part.get("type")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(
                    f"Content part of type {kind!r} is not supported by this model; "
                    "only text parts are.",
                    param=f"messages[{index}].content[{part_index}]",
                )
            pieces.append(part["text"])
        return "".join(pieces)


class _SamplingFields(_Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    stream: bool | None = None
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _check_logit_bias(cls, value: Any) -> Any:
        # Before pydantic converts each entry: an oversized map is refused by its length alone.
        if isinstance(value, dict):
            if len(value) > MAX_LOGIT_BIAS_ENTRIES:
                raise ValueError(
                    f"at most {MAX_LOGIT_BIAS_ENTRIES} entries are allowed, got {len(value)}"
                )
            for token, bias in value.items():
                if not (isinstance(token, str) and token.isdigit() and int(token) < 2**31):
                    raise ValueError(f"keys must be token ids (0 to 2^31-1), got {token[:40]!r}")
                if not isinstance(bias, int | float) or not -100 <= bias <= 100:
                    raise ValueError(
                        f"bias values must be numbers from -100 to 100, got {repr(bias)[:40]}"
                    )
        return value

    def _refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise InvalidRequest("Only n=1 is supported.", param="n")
        if self.logprobs:
            raise InvalidRequest("logprobs are not supported by this server.", param="logprobs")
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported by this server.", param="logit_bias")
        for penalty in ("presence_penalty", "frequency_penalty"):
            if getattr(self, penalty):
                raise InvalidRequest(f"{penalty} is not supported by this server.", param=penalty)

    def _sampling(self, max_tokens: int | None) -> SamplingParams:
        stop: tuple[str, ...]
        if self.stop is None:
            stop = ()
        elif isinstance(self.stop, str):
            stop = (self.stop,) if self.stop else ()
        else:
            stop = tuple(s for s in self.stop if s)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=stop,
        )


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def to_generation(self, priority: Priority = Priority.BATCH) -> GenerationRequest:
        self._refuse_unsupported()
        if self.tools:
            raise InvalidRequest("tools are not supported by this server.", param="tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise InvalidRequest(
                "Only response_format {'type': 'text'} is supported.", param="response_format"
            )
        messages = []
        for index, message in enumerate(self.messages):
            role = {"developer": "system", "tool": "user"}.get(message.role, message.role)
            messages.append(ChatMessage(role=role, content=message.text(index)))
        max_tokens = self.max_completion_tokens or self.max_tokens
        return GenerationRequest(
            model=self.model,
            params=self._sampling(max_tokens),
            messages=tuple(messages),
            priority=priority,
        )


class CompletionRequest(_SamplingFields):
    prompt: str | list[str]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    def to_generation(self, priority: Priority = Priority.BATCH) -> GenerationRequest:
        self._refuse_unsupported()
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise InvalidRequest("Exactly one prompt per request is supported.", param="prompt")
            prompt = self.prompt[0]
        else:
            prompt = self.prompt
        if self.echo:
            raise InvalidRequest("echo is not supported by this server.", param="echo")
        if self.suffix:
            raise InvalidRequest("suffix is not supported by this server.", param="suffix")
        if self.best_of not in (None, 1):
            raise InvalidRequest("Only best_of=1 is supported.", param="best_of")
        return GenerationRequest(
            model=self.model,
            params=self._sampling(self.max_tokens),
            prompt=prompt,
            priority=priority,
        )


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must not be an empty list")
        return value


def routing_field(body: dict[str, Any]) -> str | None:
    """The first field of ``body`` that would choose a destination or credentials."""
    for name in ROUTING_FIELDS:
        if name in body:
            return name
    return None


def refuse_routing_fields(body: dict[str, Any]) -> None:
    name = routing_field(body)
    if name is not None:
        raise InvalidRequest(
            f"The field '{name}' is not allowed: a request cannot choose the server it is sent"
            " to or its credentials; this server's configuration decides that.",
            param=name,
            code="unsupported_parameter",
        )


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def parse_body(endpoint: str, body: Any) -> ChatCompletionRequest | CompletionRequest:
    """Validate a request body for ``endpoint``; raise InvalidRequest naming the field."""
    parsed = check_body(endpoint, body)
    if isinstance(parsed, EmbeddingRequest):
        raise InvalidRequest(
            f"The model '{parsed.model[:200]}' runs on the embedded llama.cpp engine, which does"
            " not serve embeddings; embeddings are served by upstream (openai-http) models.",
            param="model",
            code="unsupported_endpoint",
        )
    return parsed


def check_body(
    endpoint: str, body: Any
) -> ChatCompletionRequest | CompletionRequest | EmbeddingRequest:
    """Types and ranges of a body for ``endpoint``, and no routing fields; nothing about what
    an engine supports (a body passed through to an upstream is judged by the upstream)."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", param="body")
    refuse_routing_fields(body)
    model_cls: type[ChatCompletionRequest | CompletionRequest | EmbeddingRequest]
    if endpoint == "/v1/chat/completions":
        model_cls = ChatCompletionRequest
    elif endpoint == EMBEDDINGS_ENDPOINT:
        model_cls = EmbeddingRequest
    else:
        model_cls = CompletionRequest
    try:
        return model_cls.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _loc_to_param(tuple(first["loc"]))
        raise InvalidRequest(
            f"Invalid '{param}': {first['msg']}.",
            param=param,
            code="missing_required_parameter" if first["type"] == "missing" else "invalid_value",
        ) from None


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


def chat_completion_body(model: str, result: GenerationResult) -> dict[str, Any]:
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
        "service_tier": "default",
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


def response_body(endpoint: str, model: str, result: GenerationResult) -> dict[str, Any]:
    if endpoint == "/v1/chat/completions":
        return chat_completion_body(model, result)
    return completion_body(model, result)


def error_body(
    message: str, *, type_: str = "invalid_request_error", param: str | None, code: str | None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ------------------------------------------------------------------ objects we return

COMPLETION_WINDOW_MIN_SECONDS = 60
COMPLETION_WINDOW_MAX_SECONDS = 7 * 24 * 3600
_WINDOW_UNITS = {"m": 60, "h": 3600, "d": 86400}
METADATA_MAX_KEYS = 16
METADATA_MAX_KEY_CHARS = 64
METADATA_MAX_VALUE_CHARS = 512


def parse_completion_window(value: object) -> int:
    """Seconds for ``24h`` or, as our extension, any ``<n>m|h|d`` from 1m to 7d."""
    if isinstance(value, str) and len(value) >= 2 and value[:-1].isdigit():
        unit = _WINDOW_UNITS.get(value[-1])
        if unit is not None:
            seconds = int(value[:-1]) * unit
            if COMPLETION_WINDOW_MIN_SECONDS <= seconds <= COMPLETION_WINDOW_MAX_SECONDS:
                return seconds
    raise InvalidRequest(
        f"Invalid completion_window {value!r}: use '24h' or a duration from '1m' to '7d' "
        "written as <n>m, <n>h or <n>d.",
        param="completion_window",
    )


def check_metadata(value: object) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(
            "metadata must be an object of string keys and values.", param="metadata"
        )
    if len(value) > METADATA_MAX_KEYS:
        raise InvalidRequest(
            f"metadata has {len(value)} keys; at most {METADATA_MAX_KEYS} are allowed.",
            param="metadata",
        )
    for key, item in value.items():
        if not isinstance(item, str):
            raise InvalidRequest(
                f"metadata[{key[:80]!r}] must be a string.", param=f"metadata.{key[:80]}"
            )
        if "\x00" in key or "\x00" in item:
            # No text column (PostgreSQL's least) can store NUL; refuse rather than mangle.
            raise InvalidRequest(
                f"metadata[{key[:80]!r}] contains a NUL character.", param=f"metadata.{key[:80]}"
            )
        if len(key) > METADATA_MAX_KEY_CHARS:
            raise InvalidRequest(
                f"metadata key {key[:80]!r} has {len(key)} characters; at most "
                f"{METADATA_MAX_KEY_CHARS} are allowed.",
                param="metadata",
            )
        if len(item) > METADATA_MAX_VALUE_CHARS:
            raise InvalidRequest(
                f"metadata[{key!r}] has {len(item)} characters; at most "
                f"{METADATA_MAX_VALUE_CHARS} are allowed.",
                param=f"metadata.{key}",
            )
    return value


def file_object(record: Any) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "status_details": None,
    }


def batch_object(record: Any) -> dict[str, Any]:
    counts = record.counts
    usage = record.usage
    return {
        "id": record.id,
        "object": "batch",
        "endpoint": record.endpoint,
        "model": record.model,
        "errors": {"object": "list", "data": record.errors} if record.errors else None,
        "input_file_id": record.input_file_id,
        "completion_window": record.completion_window,
        "status": record.status.value,
        "output_file_id": record.output_file_id,
        "error_file_id": record.error_file_id,
        "created_at": record.created_at,
        "in_progress_at": record.in_progress_at,
        "expires_at": record.expires_at,
        "finalizing_at": record.finalizing_at,
        "completed_at": record.completed_at,
        "failed_at": record.failed_at,
        "expired_at": record.expired_at,
        "cancelling_at": record.cancelling_at,
        "cancelled_at": record.cancelled_at,
        "request_counts": {
            "total": counts.total,
            "completed": counts.succeeded,
            # Every line that ended without a 2xx response: errored, cancelled or expired.
            # So completed + failed == total once the batch has ended.
            "failed": counts.errored + counts.canceled + counts.expired,
        },
        "usage": {
            "input_tokens": usage.input_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.input_tokens + usage.output_tokens,
        },
        "metadata": record.metadata,
    }


def list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
