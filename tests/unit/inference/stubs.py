"""A stand-in for an upstream (openai-http) engine: answers set by the test, requests kept."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from batchd.engines.base import (
    ForwardRequest,
    ForwardResponse,
    ForwardStream,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    PassthroughEngine,
    StreamDelta,
)

UPSTREAM_MODEL = "upstream-model"


async def _chunks(pieces: list[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


@dataclass
class StubUpstream:
    """Every answer comes from ``answer`` (a ForwardResponse, a GenerationResult, or an
    exception to raise); every request it got is in ``forwarded`` or ``generated``."""

    answer: object = None
    stream_pieces: list[bytes] = field(default_factory=list)
    forwarded: list[ForwardRequest] = field(default_factory=list)
    generated: list[GenerationRequest] = field(default_factory=list)
    kind: str = "openai-http"
    supports_embeddings: bool = True
    computes_locally: bool = False
    native_responses: bool = False

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id=UPSTREAM_MODEL, context_length=None, aliases=("up",))]

    def resolve_model(self, name: str) -> str | None:
        return UPSTREAM_MODEL if name in (UPSTREAM_MODEL, "up") else None

    def capacity(self) -> int:
        return 4

    def decoding_batch_only(self) -> bool:
        return False

    def unavailable_models(self) -> list[str]:
        return []

    def passthrough(self, model: str) -> PassthroughEngine | None:
        return self if model == UPSTREAM_MODEL else None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _take(self) -> object:
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    async def forward(self, request: ForwardRequest) -> ForwardResponse:
        self.forwarded.append(request)
        answer = self._take()
        assert isinstance(answer, ForwardResponse)
        return answer

    async def forward_stream(self, request: ForwardRequest) -> ForwardStream:
        self.forwarded.append(request)
        answer = self._take()
        assert isinstance(answer, ForwardResponse)
        return ForwardStream(answer.status_code, _chunks(self.stream_pieces), answer.attempts)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.generated.append(request)
        answer = self._take()
        assert isinstance(answer, GenerationResult)
        return answer

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        result = await self.generate(request)
        yield StreamDelta(text=result.text, result=result)
