"""An embedding model on its own thread: many inputs, of many requests, pooled in one
``llama_decode``.

The context is made with ``embeddings=True`` and the model's pooling (mean, for the bundled
all-MiniLM-L6-v2): llama.cpp returns one vector per sequence id. Each step packs waiting inputs,
realtime ones first, as separate sequences of one batch, up to ``n_batch`` tokens and
``max_seqs`` sequences, and hands every vector back to its request. The model is converted and
loaded by the thread on its first request, so a server that never embeds pays nothing.

Every llama.cpp object is owned by the thread; the event loop only puts jobs on the inbox and
awaits their futures (answered through ``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from batchd.engines.base import EmbedRequest, EmbedResult, Priority
from batchd.engines.llamacpp.model_files import model_params
from batchd.errors import ContextLengthExceeded, EngineError, InvalidRequest

log = logging.getLogger(__name__)


@dataclass(eq=False)
class EmbedJob:
    request: EmbedRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[EmbedResult]
    vectors: list[list[float] | None] = field(default_factory=list)
    prompt_tokens: int = 0
    left: int = 0
    cancelled: bool = False  # set from the event loop when the caller stops waiting
    failed: bool = False

    def complete(self) -> None:
        result = EmbedResult([v for v in self.vectors if v is not None], self.prompt_tokens)
        self.loop.call_soon_threadsafe(_settle, self.future, result, None)

    def fail(self, error: BaseException) -> None:
        self.failed = True
        self.loop.call_soon_threadsafe(_settle, self.future, None, error)


def _settle(
    future: asyncio.Future[EmbedResult], result: EmbedResult | None, error: BaseException | None
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert result is not None
        future.set_result(result)


@dataclass(slots=True)
class _Item:
    job: EmbedJob
    index: int
    tokens: list[int]


class Embedder:
    """One embedding model: loaded on first use by ``path()``, run on its own thread."""

    def __init__(
        self,
        model_id: str,
        path: Callable[[], Path],
        *,
        dimensions: int,
        n_threads: int,
        # Measured on the 2-core test machine (bench/bench_embeddings.py): short inputs gain
        # from many sequences a pass, and a pass of more tokens loses what it gains, as
        # every token of a pass attends to (a masked) every other.
        n_batch: int = 512,
        max_seqs: int = 64,
        context_length: int = 512,
    ) -> None:
        self.model_id = model_id
        self._path = path
        self.dimensions = dimensions
        self.n_threads = n_threads
        self.n_batch = n_batch
        self.max_seqs = max_seqs
        self.context_length = min(context_length, n_batch)  # a sequence fits one batch whole
        self.inbox: queue.SimpleQueue[EmbedJob | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"embed-{model_id}", daemon=True)
        self.model: Any = None
        self.ctx: Any = None
        self.vocab: Any = None
        self.batch: Any = None
        self.load_error: BaseException | None = None
        # Decodes run, for the benchmark and the tests: each may hold many inputs.
        self.decodes = 0

    # ---------------------------------------------------------- event loop side

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        if request.dimensions is not None and request.dimensions != self.dimensions:
            raise InvalidRequest(
                f"The model '{self.model_id}' gives {self.dimensions}-dimensional embeddings"
                f" only; it cannot shorten them to {request.dimensions} (omit dimensions or"
                f" send {self.dimensions}).",
                param="dimensions",
            )
        loop = asyncio.get_running_loop()
        job = EmbedJob(request, loop, loop.create_future())
        self.inbox.put(job)
        try:
            return await job.future
        finally:
            job.cancelled = True

    def close(self) -> None:
        self.inbox.put(None)
        if self.thread.is_alive():
            self.thread.join()

    # -------------------------------------------------------------- the thread

    def _load(self) -> None:
        path = self._path()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params())
        if not self.model:
            raise EngineError(f"could not load the embedding model {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.context_length = min(
            self.context_length, llama_cpp.llama_model_n_ctx_train(self.model)
        )
        params = llama_cpp.llama_context_default_params()
        params.embeddings = True
        params.n_ctx = self.n_batch
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch  # a non-causal model needs each sequence in one ubatch
        params.n_seq_max = self.max_seqs
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise EngineError(f"could not create an embedding context for {path}")
        n_embd = llama_cpp.llama_model_n_embd(self.model)
        if n_embd != self.dimensions:
            raise EngineError(f"{path} gives {n_embd} dimensions, not {self.dimensions}")
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def _free(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
        if self.model:
            llama_cpp.llama_model_free(self.model)
        self.batch = self.ctx = self.model = None

    def tokenize(self, text: str) -> list[int]:
        """``text`` as the model reads it, its special tokens ([CLS] ... [SEP]) added; markers
        written in the text stay text."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity, True, False)
        if n < 0:
            capacity = -n
            tokens = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity, True, False)
        return list(tokens[:n])

    def _admit(self, job: EmbedJob, waiting: deque[_Item]) -> None:
        """Tokenize ``job``'s inputs into waiting items, or fail it whole."""
        if self.load_error is not None:
            job.fail(EngineError(f"the embedding model could not be loaded: {self.load_error}"))
            return
        items = []
        for index, text in enumerate(job.request.inputs):
            tokens = self.tokenize(text)
            if len(tokens) > self.context_length:
                where = f"input[{index}]" if len(job.request.inputs) > 1 else "input"
                job.fail(
                    ContextLengthExceeded(
                        f"This model's maximum context length is {self.context_length} tokens,"
                        f" but {where} has {len(tokens)} tokens. Please shorten it.",
                        param="input",
                    )
                )
                return
            items.append(_Item(job, index, tokens))
            job.prompt_tokens += len(tokens)
        job.vectors = [None] * len(items)
        job.left = len(items)
        if not items:
            job.complete()
            return
        if job.request.priority == Priority.REALTIME:
            waiting.extendleft(reversed(items))
        else:
            waiting.extend(items)

    def _run(self) -> None:
        waiting: deque[_Item] = deque()
        try:
            while True:
                if not waiting:
                    job = self.inbox.get()
                    if job is None:
                        return
                    self._ensure_loaded()
                    self._admit(job, waiting)
                while True:  # everything that arrived meanwhile joins this step
                    try:
                        job = self.inbox.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        return
                    self._admit(job, waiting)
                self._step(waiting)
        finally:
            self._free()

    def _ensure_loaded(self) -> None:
        if self.ctx is not None or self.load_error is not None:
            return
        try:
            self._load()
        except Exception as exc:
            log.exception("loading the embedding model %s failed", self.model_id)
            self.load_error = exc
            self._free()

    def _step(self, waiting: deque[_Item]) -> None:
        """One ``llama_decode`` over as many waiting inputs as fit."""
        step: list[_Item] = []
        n_tokens = 0
        while waiting and len(step) < self.max_seqs:
            item = waiting[0]
            if item.job.cancelled or item.job.failed:
                waiting.popleft()
                continue
            if n_tokens + len(item.tokens) > self.n_batch:
                break
            waiting.popleft()
            step.append(item)
            n_tokens += len(item.tokens)
        if not step:
            return
        batch = self.batch
        batch.n_tokens = n_tokens
        at = 0
        for seq, item in enumerate(step):
            for pos, token in enumerate(item.tokens):
                batch.token[at] = token
                batch.pos[at] = pos
                batch.n_seq_id[at] = 1
                batch.seq_id[at][0] = seq
                batch.logits[at] = True
                at += 1
        memory = llama_cpp.llama_get_memory(self.ctx)
        if memory:  # a decoder: its KV must not leak into the next step
            rc = llama_cpp.llama_decode(self.ctx, batch)
            llama_cpp.llama_memory_clear(memory, True)
        else:  # an encoder (BERT) has no KV: one encode pass
            rc = llama_cpp.llama_encode(self.ctx, batch)
        self.decodes += 1
        if rc != 0:
            error = EngineError(f"llama.cpp failed with code {rc} while embedding")
            for item in step:
                if not item.job.failed:
                    item.job.fail(error)
            return
        n_embd = self.dimensions
        for seq, item in enumerate(step):
            pointer = llama_cpp.llama_get_embeddings_seq(self.ctx, seq)
            floats = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float))
            raw = np.ctypeslib.as_array(floats, (n_embd,))
            vector = np.array(raw, dtype=np.float32)
            norm = float(np.linalg.norm(vector))
            if norm > 0:
                vector /= norm
            job = item.job
            job.vectors[item.index] = vector.tolist()
            job.left -= 1
            if job.left == 0 and not job.failed:
                job.complete()
