"""OpenAI request bodies we execute: chat completions, completions and embeddings, checked
and converted to engine requests (``to_generation``); the batch endpoints and routing fields."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from batchd.engines.base import (
    ChatMessage,
    EmbedRequest,
    GenerationRequest,
    Priority,
    SamplingParams,
)
from batchd.errors import InvalidRequest

# /v1/embeddings runs only on engines that serve embeddings (upstream ones, and the embedded
# engine's bundled embedding model); a batch for it is refused at creation when no served
# model can answer it.
SUPPORTED_BATCH_ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
)
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
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on the items of one embeddings input
# [REC] OpenAI documents no count; 1,024 biased tokens is beyond any real use and keeps a
# hostile body (a million entries) from costing more than a length check.
MAX_LOGIT_BIAS_ENTRIES = 1024
INT64 = 2**63
SYSTEM_FINGERPRINT = "fp_batchd"


BodyT = TypeVar("BodyT", bound=BaseModel)


class _Body(BaseModel):
    # Unknown fields are tolerated (clients send user, store, metadata...); fields we cannot
    # honour are refused explicitly below rather than silently ignored. Strict: a string where
    # a number belongs ("max_tokens": "8") is an error, as it is upstream, not a coercion.
    model_config = ConfigDict(extra="allow", strict=True)


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


def join_text_parts(
    parts: list[dict[str, Any]], text_types: tuple[str, ...], param: str, expected: str
) -> str:
    """The text of a content list whose parts must all be text (of ``text_types``); a 400
    naming the first other part (``param`` is the list's path)."""
    pieces = []
    for part_index, part in enumerate(parts):
        kind = part.get("type")
        if kind not in text_types or not isinstance(part.get("text"), str):
            raise InvalidRequest(
                f"Content part of type {str(kind)[:100]!r} is not supported by this model; "
                f"only {expected} parts are.",
                param=f"{param}[{part_index}]",
            )
        pieces.append(part["text"])
    return "".join(pieces)


class ChatMessageIn(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return join_text_parts(self.content, ("text",), f"messages[{index}].content", "text")


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

    def to_embedding(self, priority: Priority = Priority.BATCH) -> EmbedRequest:
        """The texts to embed in-process: a string or a list of strings (token arrays are
        tiktoken ids, meaningless to another model's vocabulary, so refused)."""
        if isinstance(self.input, str):
            inputs: tuple[str, ...] = (self.input,)
        elif all(isinstance(item, str) for item in self.input):
            inputs = tuple(str(item) for item in self.input)
        else:
            raise InvalidRequest(
                "Token arrays as input are not supported by this server's embedding model:"
                " send text (a string or a list of strings).",
                param="input",
            )
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise InvalidRequest(
                f"At most {MAX_EMBEDDING_INPUTS} inputs per request; got {len(inputs)}.",
                param="input",
            )
        return EmbedRequest(self.model, inputs, dimensions=self.dimensions, priority=priority)


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
            f"The model '{parsed.model[:200]}' is not served for /v1/embeddings here: an"
            " embeddings body runs as an embedding request (EmbeddingRequest.to_embedding).",
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
    return validated(model_cls, body)


def validated(model_cls: type[BodyT], body: Any) -> BodyT:
    """``body`` as ``model_cls``, or a 400 naming the first field that is wrong."""
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
