"""A deterministic fake engine, for scheduler and queue-overhead tests that say so.

It echoes a fixed reply after ``step_seconds`` per token, counting words as tokens. It is never
the only test of a path: the real llama.cpp engine runs the end-to-end suite.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from batchd.engines.base import (
    EmbedRequest,
    EmbedResult,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    PassthroughEngine,
    StreamDelta,
)
from batchd.errors import InvalidRequest

FAKE_MODEL = "fake-echo"


class FakeEngine:
    kind = "fake"
    supports_embeddings = False
    # It only sleeps: nothing to pace the API loop for, as for an upstream.
    computes_locally = False

    def __init__(self, *, step_seconds: float = 0.0, max_seqs: int = 64) -> None:
        self.step_seconds = step_seconds
        self.max_seqs = max_seqs

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id=FAKE_MODEL, context_length=4096, aliases=("default",))]

    def resolve_model(self, name: str) -> str | None:
        return FAKE_MODEL if name in (FAKE_MODEL, "default") else None

    def capacity(self) -> int:
        return 2 * self.max_seqs

    def decoding_batch_only(self) -> bool:
        return False

    def unavailable_models(self) -> list[str]:
        return []

    def prompt_token_ids(self, request: GenerationRequest) -> list[int] | None:
        source = request.prompt or " ".join(m.content for m in request.messages or ())
        return [hash(word) % 50_000 for word in source.split()]  # a word a token

    def passthrough(self, model: str) -> PassthroughEngine | None:
        return None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        text = ""
        async for delta in self.stream(request):
            text += delta.text
            if delta.result is not None:
                return delta.result
        raise AssertionError("stream ended without a result")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        source = request.prompt or (request.messages[-1].content if request.messages else "")
        words = [f"echo:{w}" for w in source.split()] or ["echo:"]
        limit = request.params.max_tokens or len(words)
        out = words[:limit]
        for index, word in enumerate(out):
            if self.step_seconds:
                await asyncio.sleep(self.step_seconds)
            piece = word if index == 0 else " " + word
            yield StreamDelta(text=piece)
        prompt_tokens = len(source.split())
        yield StreamDelta(
            text="",
            result=GenerationResult(
                text=" ".join(out),
                finish_reason="length" if len(out) < len(words) else "stop",
                prompt_tokens=prompt_tokens,
                completion_tokens=len(out),
            ),
        )

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        raise InvalidRequest(
            f"The model '{request.model}' generates text only; it does not serve embeddings.",
            param="model",
            code="unsupported_endpoint",
        )
