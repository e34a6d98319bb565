"""One ``Engine`` over several, chosen by model id: the scheduler, the executors and the
realtime routes keep talking to a single engine whatever the registry says."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from batchd.engines.base import (
    Engine,
    ForwardRequest,
    ForwardResponse,
    ForwardStream,
    GenerationRequest,
    GenerationResult,
    LocalComputeEngine,
    ModelInfo,
    StreamDelta,
    passthrough_engine,
)
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
        self.supports_embeddings = any(
            getattr(engine, "supports_embeddings", False) for engine in self.engines
        )

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
        local = [e for e in self.engines if isinstance(e, LocalComputeEngine)]
        return any(e.decoding_batch_only() for e in local)

    def unavailable_models(self) -> list[str]:
        """Every name (ids and aliases) of models whose engine should get no more batch rows
        for now: full, or its upstream is down."""
        names: list[str] = []
        for engine in self.engines:
            check = getattr(engine, "unavailable", None)
            if check is not None and check():
                for info in engine.models():
                    names.extend((info.id, *info.aliases))
        return names

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

    # Pass-through, for the models whose engine takes bodies as they are.

    def passthrough(self, model: str) -> bool:
        engine = self._by_name.get(model)
        return engine is not None and passthrough_engine(engine, model) is not None

    async def forward(self, request: ForwardRequest) -> ForwardResponse:
        engine = passthrough_engine(self._engine(request.model), request.model)
        if engine is None:
            raise ModelNotFound(request.model)
        return await engine.forward(request)

    async def forward_stream(self, request: ForwardRequest) -> ForwardStream:
        engine = passthrough_engine(self._engine(request.model), request.model)
        if engine is None:
            raise ModelNotFound(request.model)
        return await engine.forward_stream(request)
