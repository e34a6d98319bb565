"""The embedded engine: llama.cpp through llama-cpp-python's low-level API, many sequences per
decode step (continuous batching), shared-prefix KV, realtime requests first.

One thread per model runs the decode loop and owns every llama.cpp object; the asyncio side
only puts jobs on a queue and awaits futures, so the event loop never blocks on the engine
(ctypes releases the GIL inside ``llama_decode``).

Each step builds one ``llama_batch``: the next token of every decoding sequence, plus chunks
of newcomers' prompts up to the step's token budget, so running sequences keep generating
while new ones prefill. A sequence whose prompt shares a prefix with a live sequence's KV gets
those cells by ``llama_memory_seq_cp`` and prefills only the rest.

The KV cache is split into one stream per sequence (``kv_unified=False``): measured on a 2-core
AVX2 machine, a unified cache made 64-sequence decode 3-4x slower, because every sequence's
attention then spans every sequence's cells (they interleave, so no masked tile is skipped).
Across streams llama.cpp copies only whole sequences, so a shared prefix is copied whole from
its donor and the copy's tail past the shared length is removed.

While a realtime request runs, batch sequences step out of the decode batch (their KV stays,
so resuming costs nothing) and batch prefill pauses.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2.sandbox
import llama_cpp
import numpy as np

from batchd import metrics
from batchd.engines.base import (
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    Priority,
    StreamDelta,
)
from batchd.engines.llamacpp.model_files import (
    ModelSpec,
    model_params,
    model_specs,
    requantized_q8_0,
    silence_llama_logs,
)
from batchd.errors import ContextLengthExceeded, EngineError, InvalidRequest, ModelNotFound

log = logging.getLogger(__name__)

# Share a prefix only when it saves at least this many tokens of prefill.
MIN_SHARED_PREFIX_TOKENS = 16
IDLE_WAIT_SECONDS = 0.05
# After a realtime request arrives, batch prefill goes in small steps for this long, so that
# the next realtime arrival waits for one short step rather than a 512-token prefill (~1 s
# on two cores).
REALTIME_GRACE_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class EngineOptions:
    n_threads: int = 2
    ctx_size: int = 65536  # KV cells in all; each sequence gets ctx_size // max_seqs
    max_seqs: int = 32
    n_batch: int = 512  # most tokens in one llama_decode
    prefill_chunk: int = 64  # most prompt tokens of one sequence per step
    default_max_tokens: int = 1024  # when a request sets none
    prefix_sharing: bool = True
    batch_seqs_during_realtime: int = 0
    realtime_slots: int = 2  # sequence slots batch work leaves free for realtime requests


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[GenerationResult] | None = None
    deltas: asyncio.Queue[StreamDelta | BaseException] | None = None
    cancelled: bool = False


@dataclass(eq=False)
class _Sequence:
    job: _Job
    slot: int
    prompt: list[int]
    max_new: int
    sampler: Any
    n_past: int = 0  # tokens whose KV is computed
    cached: int = 0  # prompt tokens copied from another sequence instead of computed
    donor: _Sequence | None = None  # waiting for this sequence to compute our shared prefix
    share_len: int = 0
    pending: int | None = None  # sampled, not yet decoded
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of text already streamed
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    batch_index: int = -1  # row of this step's batch whose logits we sample, or -1

    @property
    def realtime(self) -> bool:
        return self.job.request.priority == Priority.REALTIME

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)

    @property
    def tokens(self) -> list[int]:
        # Tokens whose KV cells this sequence holds, in order (what a newcomer can share).
        return self.prompt[: self.n_past] if self.prefilling else self.prompt + self.generated


class _ModelRunner:
    """Owns one model, its context and its decode thread."""

    def __init__(self, spec: ModelSpec, path: Path, options: EngineOptions) -> None:
        self.spec = spec
        self.options = options
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params())
        if not self.model:
            raise EngineError(f"could not load model {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.context_length = min(
            llama_cpp.llama_model_n_ctx_train(self.model), options.ctx_size // options.max_seqs
        )
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = options.ctx_size
        params.n_batch = options.n_batch
        params.n_ubatch = options.n_batch
        params.n_seq_max = options.max_seqs
        params.n_threads = options.n_threads
        params.n_threads_batch = options.n_threads
        params.kv_unified = False  # one stream per sequence: attention spans only its own
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise EngineError(f"could not create a llama.cpp context for {path}")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(options.n_batch, 0, 1)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        template = llama_cpp.llama_model_chat_template(self.model, None)
        self.template = (
            jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True
            ).from_string(template.decode("utf-8"))
            if template
            else None
        )
        self.bos_text = self._piece(llama_cpp.llama_vocab_bos(self.vocab))
        self.eos_text = self._piece(llama_cpp.llama_vocab_eos(self.vocab))

        self.inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.waiting_realtime: deque[_Sequence] = deque()
        self.waiting_batch: deque[_Sequence] = deque()
        self.active: list[_Sequence] = []
        self.free_slots = list(range(options.max_seqs - 1, -1, -1))
        self.thread = threading.Thread(target=self._run, name=f"engine-{spec.id}", daemon=True)
        self.stopping = False
        self.last_realtime = float("-inf")

    # ------------------------------------------------------------ tokens

    def _piece(self, token: int) -> str:
        return self._piece_bytes(token).decode("utf-8", "replace")

    def _piece_bytes(self, token: int) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
        return buffer.raw[:n]

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 16
        tokens = (llama_cpp.llama_token * capacity)()
        # parse_special: the chat template's markers (<|im_start|>...) are single tokens.
        n = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), tokens, capacity, add_special, True
        )
        if n < 0:
            capacity = -n
            tokens = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(
                self.vocab, data, len(data), tokens, capacity, add_special, True
            )
        return list(tokens[:n])

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            if self.template is None:
                raise InvalidRequest(
                    f"Model {self.spec.id} has no chat template; use /v1/completions.",
                    param="messages",
                )
            text = self.template.render(
                messages=[{"role": m.role, "content": m.content} for m in request.messages],
                add_generation_prompt=True,
                bos_token=self.bos_text,
                eos_token=self.eos_text,
            )
            return self.tokenize(text, add_special=False)
        return self.tokenize(request.prompt or "", add_special=self.add_bos)

    # --------------------------------------------------------- admission

    def _prepare(self, job: _Job) -> _Sequence | None:
        request = job.request
        param = "messages" if request.messages is not None else "prompt"
        try:
            prompt = self.prompt_tokens(request)
            if not prompt:
                raise InvalidRequest("The prompt is empty.", param=param)
            limit = self.context_length
            wanted = request.params.max_tokens
            if len(prompt) >= limit or (wanted is not None and len(prompt) + wanted > limit):
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {limit} tokens. However, you "
                    f"requested {len(prompt) + (wanted or 0)} tokens ({len(prompt)} in the "
                    f"prompt, {wanted or 0} for the completion). Please reduce the length of "
                    "the messages or completion.",
                    param=param,
                )
            max_new = wanted or min(self.options.default_max_tokens, limit - len(prompt))
        except Exception as exc:
            self._fail(job, exc)
            return None
        return _Sequence(job=job, slot=-1, prompt=prompt, max_new=max_new, sampler=None)

    def _admit(self) -> None:
        options = self.options
        for waiting in (self.waiting_realtime, self.waiting_batch):
            # Batch work never takes the last slots: a realtime arrival must not wait for a
            # batch sequence to finish before it can even start.
            keep = 0 if waiting is self.waiting_realtime else options.realtime_slots
            while waiting and len(self.free_slots) > keep:
                seq = waiting[0]
                if seq.job.cancelled:
                    waiting.popleft()
                    self._finish_cancelled(seq)
                    continue
                waiting.popleft()
                seq.slot = min(self.free_slots)  # keep active slots low and contiguous
                self.free_slots.remove(seq.slot)
                seq.sampler = self._sampler(seq.job.request)
                if options.prefix_sharing:
                    self._find_donor(seq)
                self.active.append(seq)

    def _find_donor(self, seq: _Sequence) -> None:
        best, best_len = None, 0
        prompt = seq.prompt
        for other in self.active:
            if other.donor is not None:
                continue
            if seq.realtime:
                # Only KV already computed: a realtime newcomer must not wait for a batch
                # sequence that steps aside while realtime work runs (that would deadlock).
                theirs = other.tokens
            else:
                theirs = other.prompt if other.prefilling else other.tokens
            n = 0
            limit = min(len(theirs), len(prompt) - 1)  # always compute our last prompt token
            while n < limit and theirs[n] == prompt[n]:
                n += 1
            if n > best_len:
                best, best_len = other, n
        if best is not None and best_len >= MIN_SHARED_PREFIX_TOKENS:
            seq.donor, seq.share_len = best, best_len

    def _take_from_donor(self, seq: _Sequence) -> None:
        donor = seq.donor
        assert donor is not None
        if donor not in self.active:  # the donor ended first: compute the prefix ourselves
            seq.donor = None
            return
        if donor.n_past < seq.share_len:
            return  # the donor is still computing the part we want
        # Whole-sequence copy (the only kind across streams), then drop what is not shared.
        llama_cpp.llama_memory_seq_cp(self.memory, donor.slot, seq.slot, -1, -1)
        llama_cpp.llama_memory_seq_rm(self.memory, seq.slot, seq.share_len, -1)
        seq.n_past = seq.cached = seq.share_len
        seq.donor = None

    def _sampler(self, request: GenerationRequest) -> Any:
        params = request.params
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if params.temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        if params.top_k > 0:
            llama_cpp.llama_sampler_chain_add(
                chain, llama_cpp.llama_sampler_init_top_k(params.top_k)
            )
        if params.top_p < 1.0:
            llama_cpp.llama_sampler_chain_add(
                chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1)
            )
        llama_cpp.llama_sampler_chain_add(
            chain, llama_cpp.llama_sampler_init_temp(params.temperature)
        )
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        llama_cpp.llama_sampler_chain_add(
            chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF)
        )
        return chain

    def decoding_batch_only(self) -> bool:
        """Batch sequences in the step and no realtime one running, waiting or recent. Read
        from the event loop while this thread steps: each read is atomic under the GIL, and
        a stale answer lasts one loop iteration."""
        if not self.active or self.waiting_realtime or self.realtime_recent():
            return False
        return not any(seq.realtime for seq in self.active)

    def realtime_recent(self) -> bool:
        return time.monotonic() - self.last_realtime < REALTIME_GRACE_SECONDS

    # ------------------------------------------------------------- steps

    def _run(self) -> None:
        try:
            while not self.stopping:
                self._drain_inbox(block=not self.active and not self._waiting())
                if self.stopping:
                    break
                self._admit()
                if self.active:
                    self._step()
        except Exception:  # a bug here must not leave callers waiting forever
            log.exception("engine loop crashed", extra={"action": "engine_crashed"})
            error = EngineError("The engine failed while processing this request.")
            for seq in [*self.active, *self.waiting_realtime, *self.waiting_batch]:
                self._fail(seq.job, error)
        finally:
            for seq in [*self.active, *self.waiting_realtime, *self.waiting_batch]:
                self._fail(seq.job, EngineError("The engine stopped."))

    def _waiting(self) -> bool:
        return bool(self.waiting_realtime or self.waiting_batch)

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                job = (
                    self.inbox.get(timeout=IDLE_WAIT_SECONDS) if block else self.inbox.get_nowait()
                )
            except queue.Empty:
                return
            block = False
            if job is None:
                self.stopping = True
                return
            if job.request.priority == Priority.REALTIME:
                self.last_realtime = time.monotonic()
            seq = self._prepare(job)
            if seq is not None:
                (self.waiting_realtime if seq.realtime else self.waiting_batch).append(seq)

    def _step(self) -> None:
        options = self.options
        batch = self.batch
        for seq in [s for s in self.active if s.job.cancelled]:
            self._release(seq)
            self._finish_cancelled(seq)
        self._compact_slots()
        realtime_active = any(s.realtime for s in self.active)
        realtime_recent = time.monotonic() - self.last_realtime < REALTIME_GRACE_SECONDS
        budget = options.n_batch
        batch_prefill_budget = options.prefill_chunk if realtime_recent else options.n_batch
        n = 0
        batch_decoding = 0
        stepping: list[tuple[_Sequence, int]] = []  # (sequence, tokens it adds this step)

        # Decode tokens first: one per running sequence (realtime ones before batch ones).
        for seq in sorted(self.active, key=lambda s: not s.realtime):
            seq.batch_index = -1
            if seq.pending is None or budget == 0:
                continue
            if realtime_active and not seq.realtime:
                if batch_decoding >= options.batch_seqs_during_realtime:
                    continue  # steps aside; its KV stays, so resuming later is free
                batch_decoding += 1
            stepping.append((seq, 1))
            budget -= 1
        # Then prompt chunks of prefilling sequences, within the step's token budget.
        for seq in self.active:
            if budget == 0:
                break
            if seq.pending is not None or not seq.prefilling:
                continue
            if seq.donor is not None:
                self._take_from_donor(seq)
                if seq.donor is not None or not seq.prefilling:
                    continue
            if realtime_active and not seq.realtime:
                continue  # batch prefill waits while realtime work runs
            remaining = len(seq.prompt) - seq.n_past
            if seq.realtime:
                chunk = min(remaining, budget)
            else:
                chunk = min(remaining, budget, options.prefill_chunk, batch_prefill_budget)
                if chunk <= 0:
                    continue
                batch_prefill_budget -= chunk
            stepping.append((seq, chunk))
            budget -= chunk
        # Rows must go in ascending sequence id: with one KV stream per sequence, llama.cpp
        # stepped a shuffled batch 2.3x slower than the same batch sorted (measured).
        stepping.sort(key=lambda item: item[0].slot)
        for seq, count in stepping:
            if seq.pending is not None:
                seq.batch_index = n
                batch.token[n] = seq.pending
                batch.pos[n] = seq.n_past
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq.slot
                batch.logits[n] = True
                n += 1
                continue
            last_position = len(seq.prompt) - 1
            for position in range(seq.n_past, seq.n_past + count):
                batch.token[n] = seq.prompt[position]
                batch.pos[n] = position
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq.slot
                batch.logits[n] = position == last_position
                if position == last_position:
                    seq.batch_index = n
                n += 1
        if n == 0:
            return
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            self._decode_failed(rc, stepping)
            return
        for seq, added in stepping:
            if seq.pending is not None:
                seq.generated.append(seq.pending)
                seq.pending = None
            seq.n_past += added
            if seq.batch_index >= 0:
                if seq.job.request.params.temperature <= 0:
                    # Greedy: argmax straight over llama.cpp's logits row, no copy. The sampler
                    # chain would first build a 49k-entry candidate array per sequence per step.
                    row = llama_cpp.llama_get_logits_ith(self.ctx, seq.batch_index)
                    token = int(np.ctypeslib.as_array(row, shape=(self.n_vocab,)).argmax())
                else:
                    token = llama_cpp.llama_sampler_sample(seq.sampler, self.ctx, seq.batch_index)
                self._on_token(seq, token)

    def _compact_slots(self) -> None:
        """Move sequences from high slots into holes left by finished ones.

        With one KV stream per sequence, llama.cpp builds each step over the range of streams
        from the lowest to the highest sequence id in the batch; holes in that range cost as
        much as live sequences (measured: 16 even-numbered sequences stepped 2x slower than 20
        contiguous ones). Moving a sequence is a whole-stream copy, a fraction of a millisecond.
        """
        n_active = len(self.active)
        holes = sorted(slot for slot in self.free_slots if slot < n_active)
        if not holes:
            return
        movers = sorted((s for s in self.active if s.slot >= n_active), key=lambda s: -s.slot)
        for seq, hole in zip(movers, holes, strict=False):
            if seq.n_past > 0:
                llama_cpp.llama_memory_seq_cp(self.memory, seq.slot, hole, -1, -1)
                llama_cpp.llama_memory_seq_rm(self.memory, seq.slot, -1, -1)
            self.free_slots.remove(hole)
            self.free_slots.append(seq.slot)
            seq.slot = hole

    def _decode_failed(self, rc: int, stepping: list[tuple[_Sequence, int]]) -> None:
        # 1: no KV slot for this batch. Reservations make it unlikely; shed the youngest
        # batch sequence so the others can go on. Negative: an error; fail this step's work.
        log.error("llama_decode returned %s", rc, extra={"action": "decode_failed", "rc": rc})
        victims = [s for s, _ in stepping]
        if rc == 1:
            batch_seqs = [s for s in victims if not s.realtime]
            victims = batch_seqs[-1:] or victims[-1:]
        for seq in victims:
            self._release(seq)
            self._fail(seq.job, EngineError(f"The engine could not run this request (code {rc})."))

    def _on_token(self, seq: _Sequence, token: int) -> None:
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            self._finish(seq, "stop")
            return
        seq.pending = token
        piece = seq.decoder.decode(self._piece_bytes(token))
        seq.text += piece
        stops = seq.job.request.params.stop
        if stops:
            window = max(len(s) for s in stops) + len(piece)
            start = max(0, len(seq.text) - window)
            hits = [(seq.text.find(s, start), s) for s in stops]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                index, matched = min(hits)
                seq.text = seq.text[:index]
                seq.generated.append(token)
                seq.pending = None
                self._finish(seq, "stop", matched)
                return
        if len(seq.generated) + 1 >= seq.max_new or seq.n_past + 1 >= self.context_length:
            seq.generated.append(token)
            seq.pending = None
            self._finish(seq, "length")
            return
        if seq.job.deltas is not None:
            self._emit(seq, final=False)

    def _emit(self, seq: _Sequence, final: bool) -> None:
        safe = len(seq.text)
        if not final:
            # Hold back a tail that could still grow into a stop string.
            for stop in seq.job.request.params.stop:
                for k in range(min(len(stop) - 1, len(seq.text)), 0, -1):
                    if seq.text.endswith(stop[:k]):
                        safe = min(safe, len(seq.text) - k)
                        break
        if safe > seq.emitted:
            delta = StreamDelta(text=seq.text[seq.emitted : safe])
            seq.emitted = safe
            self._deliver(seq.job, delta)

    # --------------------------------------------------------- endings

    def _release(self, seq: _Sequence) -> None:
        if seq in self.active:
            self.active.remove(seq)
            llama_cpp.llama_memory_seq_rm(self.memory, seq.slot, -1, -1)
            self.free_slots.append(seq.slot)
        if seq.sampler is not None:
            llama_cpp.llama_sampler_free(seq.sampler)
            seq.sampler = None

    def _finish(self, seq: _Sequence, reason: str, stop_sequence: str | None = None) -> None:
        self._release(seq)
        seq.text += (
            seq.decoder.decode(b"", final=True) if reason != "stop" or not stop_sequence else ""
        )
        metrics.count_tokens(seq.job.request.model, len(seq.prompt), len(seq.generated))
        result = GenerationResult(
            text=seq.text,
            finish_reason="length" if reason == "length" else "stop",
            prompt_tokens=len(seq.prompt),
            # Sampled tokens, excluding the end-of-generation token that ended the reply.
            completion_tokens=len(seq.generated),
            cached_tokens=seq.cached,
            stop_sequence=stop_sequence,
        )
        job = seq.job
        if job.deltas is not None:
            self._emit(seq, final=True)
            self._deliver(job, StreamDelta(text="", result=result))
        elif job.future is not None:
            job.loop.call_soon_threadsafe(_resolve, job.future, result)

    def _finish_cancelled(self, seq: _Sequence) -> None:
        self._fail(seq.job, asyncio.CancelledError())

    def _fail(self, job: _Job, error: BaseException) -> None:
        if job.deltas is not None:
            self._deliver(job, error)
        elif job.future is not None:
            job.loop.call_soon_threadsafe(_reject, job.future, error)

    def _deliver(self, job: _Job, item: StreamDelta | BaseException) -> None:
        assert job.deltas is not None
        job.loop.call_soon_threadsafe(job.deltas.put_nowait, item)

    def close(self) -> None:
        self.stopping = True
        self.inbox.put(None)
        self.thread.join(timeout=30)
        for seq in list(self.active):
            self._release(seq)
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


def _resolve(future: asyncio.Future[GenerationResult], result: GenerationResult) -> None:
    if not future.done():
        future.set_result(result)


def _reject(future: asyncio.Future[GenerationResult], error: BaseException) -> None:
    if not future.done():
        if isinstance(error, asyncio.CancelledError):
            future.cancel()
        else:
            future.set_exception(error)


class LlamaCppEngine:
    kind = "llamacpp"

    def __init__(
        self,
        *,
        models: list[tuple[str, str]],
        data_dir: Path,
        quant: str = "q8_0",
        n_threads: int = 2,
        ctx_size: int = 65536,
        max_seqs: int = 32,
        prefix_sharing: bool = True,
        n_batch: int = 512,
        prefill_chunk: int = 64,
        default_max_tokens: int = 1024,
        batch_seqs_during_realtime: int = 0,
        realtime_slots: int = 2,
    ) -> None:
        self.options = EngineOptions(
            n_threads=n_threads,
            ctx_size=ctx_size,
            max_seqs=max_seqs,
            n_batch=n_batch,
            prefill_chunk=prefill_chunk,
            default_max_tokens=default_max_tokens,
            prefix_sharing=prefix_sharing,
            batch_seqs_during_realtime=batch_seqs_during_realtime,
            realtime_slots=min(realtime_slots, max_seqs - 1),
        )
        self.specs = model_specs(models)
        self.data_dir = data_dir
        self.quant = quant
        self.runners: dict[str, _ModelRunner] = {}
        self.names: dict[str, str] = {}
        for spec in self.specs:
            for name in (spec.id, *spec.aliases):
                self.names.setdefault(name, spec.id)

    def _load(self) -> None:
        silence_llama_logs()
        llama_cpp.llama_backend_init()
        for spec in self.specs:
            path = spec.path
            if spec.bundled and self.quant == "q8_0":
                path = requantized_q8_0(path, self.data_dir / "models", self.options.n_threads)
            runner = _ModelRunner(spec, path, self.options)
            runner.thread.start()
            self.runners[spec.id] = runner

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    async def close(self) -> None:
        runners, self.runners = list(self.runners.values()), {}
        for runner in runners:
            await asyncio.to_thread(runner.close)

    def models(self) -> list[ModelInfo]:
        infos = []
        for spec in self.specs:
            runner = self.runners.get(spec.id)
            length = runner.context_length if runner else self.options.ctx_size
            infos.append(ModelInfo(id=spec.id, context_length=length, aliases=spec.aliases))
        return infos

    def resolve_model(self, name: str) -> str | None:
        return self.names.get(name)

    def capacity(self) -> int:
        return 2 * self.options.max_seqs * max(1, len(self.specs))

    def decoding_batch_only(self) -> bool:
        runners = list(self.runners.values())
        if any(runner.realtime_recent() for runner in runners):
            return False  # realtime work on one model: no pacing for any
        return any(runner.decoding_batch_only() for runner in runners)

    def _runner(self, request: GenerationRequest) -> _ModelRunner:
        runner = self.runners.get(self.names.get(request.model, ""))
        if runner is None:
            raise ModelNotFound(request.model)
        if request.priority == Priority.REALTIME:
            # Marked on arrival, not when the engine thread drains its inbox (up to a step
            # later): the loop stops pacing before the request even reaches the engine.
            runner.last_realtime = time.monotonic()
        return runner

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        runner = self._runner(request)
        loop = asyncio.get_running_loop()
        job = _Job(request=request, loop=loop, future=loop.create_future())
        runner.inbox.put(job)
        assert job.future is not None
        try:
            return await job.future
        finally:
            job.cancelled = True  # harmless once finished; stops the sequence if not

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        runner = self._runner(request)
        job = _Job(request=request, loop=asyncio.get_running_loop(), deltas=asyncio.Queue())
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
