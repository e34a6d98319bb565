"""One ``Engine`` over several, chosen by model id: the scheduler, the executors and the
realtime routes keep talking to a single engine whatever the registry says."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from batchd.engines.base import (
    EmbedRequest,
    EmbedResult,
    Engine,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    PassthroughEngine,
    StreamDelta,
)
from batchd.engines.openai_http.shared_limits import SharedLimits
from batchd.errors import ModelNotFound


class RouterEngine:
    kind = "router"

    def __init__(self, engines: Sequence[Engine]) -> None:
        self.engines = list(engines)
        self._by_name: dict[str, Engine] = {}
        for engine in self.engines:
            for info in engine.models():
                for name in (info.id, *info.aliases):
                    if name in self._by_name:
                        raise ValueError(f"model name {name!r} is served by two engines")
                    self._by_name[name] = engine
        self.supports_embeddings = any(engine.supports_embeddings for engine in self.engines)
        # Asked on every loop iteration (decoding_batch_only): only the local engines.
        self._local = [engine for engine in self.engines if engine.computes_locally]
        self.computes_locally = bool(self._local)

    def _engine(self, model: str) -> Engine:
        engine = self._by_name.get(model)
        if engine is None:
            raise ModelNotFound(model)
        return engine

    def models(self) -> list[ModelInfo]:
        infos = []
        for engine in self.engines:
            for info in engine.models():
                infos.append(info if info.kind else replace(info, kind=engine.kind))
        return infos

    def resolve_model(self, name: str) -> str | None:
        engine = self._by_name.get(name)
        return engine.resolve_model(name) if engine is not None else None

    def capacity(self) -> int:
        return sum(engine.capacity() for engine in self.engines)

    def decoding_batch_only(self) -> bool:
        return any(engine.decoding_batch_only() for engine in self._local)

    def unavailable_models(self) -> list[str]:
        return [name for engine in self.engines for name in engine.unavailable_models()]

    def prompt_token_ids(self, request: GenerationRequest) -> list[int] | None:
        return self._engine(request.model).prompt_token_ids(request)

    def passthrough(self, model: str) -> PassthroughEngine | None:
        engine = self._by_name.get(model)
        return engine.passthrough(model) if engine is not None else None

    def share_limits(self, shared: SharedLimits) -> None:
        """Hand the deployment's upstream budget to every engine that has upstream limits."""
        for engine in self.engines:
            share = getattr(engine, "share_limits", None)
            if share is not None:
                share(shared)

    async def start(self) -> None:
        for engine in self.engines:
            await engine.start()

    async def close(self) -> None:
        for engine in self.engines:
            await engine.close()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await self._engine(request.model).generate(request)

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        return self._engine(request.model).stream(request)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        return await self._engine(request.model).embed(request)
