"""The engine contract: one generate method, one stream method, capability attributes.

An engine turns a normalized generation request (already validated by ``batchd.protocol``)
into text plus exact token counts. It owns its own threads; every method here is called from
the asyncio event loop and must never block it.

Cancellation is asyncio cancellation: cancelling the task awaiting ``generate`` (or closing
the ``stream`` iterator) must remove the sequence from the engine within one decode step.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol


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


@dataclass(slots=True)
class GenerationResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV was shared, not recomputed
    stop_sequence: str | None = None  # which stop string ended generation, if any


@dataclass(slots=True)
class StreamDelta:
    """One piece of a streamed generation; the last one carries ``result``."""

    text: str
    result: GenerationResult | None = None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: str
    context_length: int
    aliases: tuple[str, ...] = field(default=())


class Engine(Protocol):
    kind: str  # "llamacpp", "openai-http", "fake"

    def models(self) -> list[ModelInfo]: ...

    def resolve_model(self, name: str) -> str | None:
        """The served model id for a requested name or alias, or None if not served."""
        ...

    def capacity(self) -> int:
        """How many batch requests the caller should keep in flight to keep the engine full."""
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
