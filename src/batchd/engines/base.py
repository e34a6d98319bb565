"""The engine contract: one generate method, one stream method, declared capabilities.

An engine turns a normalized generation request (already validated by ``batchd.protocol``)
into text plus exact token counts. It owns its own threads; every method here is called from
the asyncio event loop and must never block it.

What differs between engines (embeddings, computing on this machine, pass-through, an upstream
that is down) is declared by every engine on the protocol, never probed with ``getattr`` or
``isinstance``: a new engine cannot forget a capability without the type checker saying so.

Cancellation is asyncio cancellation: cancelling the task awaiting ``generate`` (or closing
the ``stream`` iterator) must remove the sequence from the engine within one decode step.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


class Priority(enum.IntEnum):
    # Lower runs first: realtime requests are admitted ahead of any batch work.
    REALTIME = 0
    BATCH = 1


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant" (developer is mapped to system upstream)
    content: str


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int | None = None  # None: until EOS or the context is full
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    model: str  # a served model id (aliases already resolved by the caller or the engine)
    params: SamplingParams
    # Exactly one of messages (chat: the engine applies the model's chat template) or prompt.
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    priority: Priority = Priority.BATCH
    # Wall-clock time (epoch seconds) after which the result is no longer wanted: a batch's
    # expires_at. Engines that retry (upstream ones) retry until then; None: their own limit.
    deadline: float | None = None
    # Anthropic's cache breakpoints (``cache_control``): for each, the messages up to and
    # including the marked block. An engine that can tells their lengths in prompt tokens
    # (``GenerationResult.cache_prefix_tokens``).
    cache_prefixes: tuple[tuple[ChatMessage, ...], ...] = ()
    # A realtime request served ahead of the other realtime ones (service_tier "priority").
    urgent: bool = False
    # Prompt + completion at most this many tokens, below the model's own context: the
    # realtime limit (BATCHD_REALTIME_MAX_CONTEXT_TOKENS), which batch lines may exceed.
    max_context: int | None = None


@dataclass(slots=True)
class GenerationResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV was shared, not recomputed
    stop_sequence: str | None = None  # which stop string ended generation, if any
    # The length in prompt tokens of each of the request's ``cache_prefixes``, in order; empty
    # when the request marked none or the engine cannot tell (an upstream one).
    cache_prefix_tokens: tuple[int, ...] = ()
    attempts: int = 1  # HTTP attempts an upstream engine made (1 for in-process engines)


@dataclass(slots=True)
class StreamDelta:
    """One piece of a streamed generation; the last one carries ``result``."""

    text: str
    result: GenerationResult | None = None


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """Texts to embed with one model, in one request (an OpenAI ``input`` string or list)."""

    model: str  # a served model id
    inputs: tuple[str, ...]
    dimensions: int | None = None  # None: the model's own; others only where it allows them
    priority: Priority = Priority.BATCH


@dataclass(slots=True)
class EmbedResult:
    vectors: list[list[float]]  # one per input, in input order, each of unit length
    prompt_tokens: int  # every input's tokens, special ones included


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: str
    context_length: int | None  # None: not known here (an upstream that did not say)
    aliases: tuple[str, ...] = field(default=())
    kind: str | None = None  # the engine serving it, when several engines are routed


class RetryLater(Exception):
    """An engine gave up holding a request for now, but its deadline still allows more tries
    (an upstream answering 429/5xx, unreachable, or blocked by its circuit): the caller should
    give the request's slot back and queue it again. ``attempts`` counts the HTTP attempts made.

    Not a ``BatchdError``: it is never a request's outcome and never reaches a client.
    """

    def __init__(self, attempts: int, reason: str) -> None:
        super().__init__(reason)
        self.attempts = attempts
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ForwardRequest:
    """An OpenAI-shaped body to pass through to an upstream unchanged but for ``model``."""

    model: str  # the served model id (resolved)
    endpoint: str  # "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
    body: dict[str, Any]
    priority: Priority = Priority.BATCH
    deadline: float | None = None


@dataclass(slots=True)
class ForwardResponse:
    status_code: int
    body: bytes  # the upstream's response body, as it sent it
    attempts: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(slots=True)
class ForwardStream:
    """A streamed upstream answer: a status and headers first, then the raw SSE bytes."""

    status_code: int
    chunks: AsyncIterator[bytes]
    attempts: int


class PassthroughEngine(Protocol):
    """An engine that can also take OpenAI bodies as they are (an upstream HTTP server), so
    nothing the upstream supports is lost by a round trip through ``GenerationRequest``."""

    # Whether Responses API bodies go to the upstream's own /v1/responses as they are; if not,
    # they run as generation requests (which an upstream sends on as chat completions).
    native_responses: bool

    async def forward(self, request: ForwardRequest) -> ForwardResponse: ...

    async def forward_stream(self, request: ForwardRequest) -> ForwardStream: ...


class Engine(Protocol):
    kind: str  # "llamacpp", "openai-http", "fake", "router"
    # Whether some model it serves answers /v1/embeddings (an upstream's, or the embedded
    # engine's bundled embedding model), so batches for that endpoint are accepted.
    supports_embeddings: bool
    # Whether it computes on this machine's CPUs, beside the API (the embedded engine): only
    # then may the API moderate its wake-ups (loop_pacing.py).
    computes_locally: bool

    def models(self) -> list[ModelInfo]: ...

    def resolve_model(self, name: str) -> str | None:
        """The served model id for a requested name or alias, or None if not served."""
        ...

    def capacity(self) -> int:
        """How many batch requests the caller should keep in flight to keep the engine full."""
        ...

    def decoding_batch_only(self) -> bool:
        """Whether it is decoding batch work on this machine with no realtime request running,
        waiting or recent: the API may then moderate its wake-ups (loop_pacing.py). Always
        False for an engine that does not compute locally. Called from the event loop on every
        iteration, so it must be cheap and must not block."""
        ...

    def unavailable_models(self) -> list[str]:
        """Every name (ids and aliases) of models that should get no more batch rows for now:
        their engine is full or their upstream is down. Empty for in-process engines."""
        ...

    def prompt_token_ids(self, request: GenerationRequest) -> list[int] | None:
        """The request's prompt as its model's tokenizer makes it (chat template applied), or
        None where no tokenizer is at hand (an upstream model). For estimates before
        submitting; never on the serving path."""
        ...

    def passthrough(self, model: str) -> PassthroughEngine | None:
        """The engine to pass ``model``'s (a served id) OpenAI bodies through to unchanged, or
        None if the model runs in-process from a ``GenerationRequest``."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run one request to completion.

        Raises ``batchd.errors.InvalidRequest`` (for example ``ContextLengthExceeded``) for a
        request only the engine can judge, and ``batchd.errors.EngineError`` for engine faults.
        """
        ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]: ...

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Embed every input of ``request`` with a model served in-process (an upstream's
        embeddings are passed through instead). Raises ``batchd.errors.InvalidRequest`` for a
        model that does not embed, an input too long, or ``dimensions`` it cannot give."""
        ...
