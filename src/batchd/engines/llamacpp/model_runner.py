"""One model on its own decode thread: its llama.cpp context and the per-step loop.

Each step builds one ``llama_batch``: the next token of every decoding sequence, plus chunks
of newcomers' prompts up to the step's token budget, so running sequences keep generating
while new ones prefill. While a realtime request runs, batch sequences step out of the decode
batch (their KV stays, so resuming costs nothing) and batch prefill pauses.

The step is the hot path: per token it does no allocation and calls nothing but llama.cpp
and the sequence's own decoder, which is why sampling and stop detection are written inline.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from pathlib import Path

import llama_cpp
import numpy as np

from batchd import metrics
from batchd.engines.base import GenerationRequest, GenerationResult, Priority, StreamDelta
from batchd.engines.llamacpp import zero_pages
from batchd.engines.llamacpp.jobs import Job
from batchd.engines.llamacpp.model_files import ModelSpec, model_params
from batchd.engines.llamacpp.options import EngineOptions
from batchd.engines.llamacpp.sampling import free_sampler, sampler_chain
from batchd.engines.llamacpp.sequences import (
    MIN_SHARED_PREFIX_TOKENS,
    SequenceState,
    SlotTable,
    find_donor,
)
from batchd.engines.llamacpp.tokenizer import Tokenizer
from batchd.errors import ContextLengthExceeded, EngineError, InvalidRequest

log = logging.getLogger(__name__)

IDLE_WAIT_SECONDS = 0.05
# After a realtime request arrives, batch prefill goes in small steps for this long, so that
# the next realtime arrival waits for one short step rather than a 512-token prefill (~1 s
# on two cores).
REALTIME_GRACE_SECONDS = 2.0


class ModelRunner:
    """Owns one model, its context and its decode thread (started by the caller)."""

    def __init__(self, spec: ModelSpec, path: Path, options: EngineOptions) -> None:
        self.spec = spec
        self.options = options
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params())
        if not self.model:
            raise EngineError(f"could not load model {path}")
        self.tokenizer = Tokenizer(self.model, spec.id)
        self.vocab = self.tokenizer.vocab
        self.n_vocab = self.tokenizer.n_vocab
        self._piece_bytes = self.tokenizer.piece_bytes  # bound once: called for every token
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
        if options.kv_type == "q8_0":
            # Half the KV memory; a quantized V cache needs flash attention.
            params.type_k = params.type_v = llama_cpp.GGML_TYPE_Q8_0
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.no_perf = True
        # llama.cpp clears the whole KV cache as it makes the context, which would make it all
        # resident: its pages are given back as the clear goes, and once more after it, until
        # sequences write into them (zero_pages.py says why this is safe).
        value_bytes = 34 / 32 if options.kv_type == "q8_0" else 2
        kv_bytes = zero_pages.kv_cache_bytes(self.model, options.ctx_size, value_bytes)
        before = zero_pages.anonymous_regions()
        with zero_pages.released_while_made(before, kv_bytes // 2) as sweep:
            self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise EngineError(f"could not create a llama.cpp context for {path}")
        self.kv_bytes_released = sweep.released + zero_pages.release_new_zero_memory(
            before, kv_bytes // 2
        )
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(options.n_batch, 0, 1)
        self.slots = SlotTable(
            self.ctx,
            self.memory,
            options.max_seqs,
            cache=options.prefix_cache,
            cache_cells=options.prefix_cache_cells,
        )

        self.inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.waiting_realtime: deque[SequenceState] = deque()
        self.waiting_batch: deque[SequenceState] = deque()
        self.active: list[SequenceState] = []
        self.thread = threading.Thread(target=self._run, name=f"engine-{spec.id}", daemon=True)
        self.stopping = False
        self.last_realtime = float("-inf")

    # ------------------------------------------------------------ tokens

    @property
    def add_bos(self) -> bool:
        return self.tokenizer.add_bos

    @property
    def free_slots(self) -> list[int]:
        return self.slots.free

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self.tokenizer.tokenize(text, add_special)

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        return self.tokenizer.prompt_tokens(request)

    # --------------------------------------------------------- admission

    def _prepare(self, job: Job) -> SequenceState | None:
        request = job.request
        param = "messages" if request.messages is not None else "prompt"
        try:
            prompt = self.prompt_tokens(request)
            if not prompt:
                raise InvalidRequest("The prompt is empty.", param=param)
            limit = self.context_length
            whose = "This model's maximum context length"
            if request.max_context is not None and request.max_context < limit:
                limit = request.max_context
                whose = (
                    "This server's context limit for realtime requests (batches may use the"
                    f" model's {self.context_length})"
                )
            wanted = request.params.max_tokens
            if len(prompt) >= limit or (wanted is not None and len(prompt) + wanted > limit):
                raise ContextLengthExceeded(
                    f"{whose} is {limit} tokens. However, you "
                    f"requested {len(prompt) + (wanted or 0)} tokens ({len(prompt)} in the "
                    f"prompt, {wanted or 0} for the completion). Please reduce the length of "
                    "the messages or completion.",
                    param=param,
                )
            max_new = wanted or min(self.options.default_max_tokens, limit - len(prompt))
            marks = self.tokenizer.cache_prefix_lengths(request, prompt)
        except Exception as exc:
            job.fail(exc)
            return None
        return SequenceState(
            job=job, slot=-1, prompt=prompt, max_new=max_new, sampler=None, cache_marks=marks
        )

    def _admit(self) -> None:
        options = self.options
        free = self.slots.free
        for waiting in (self.waiting_realtime, self.waiting_batch):
            # Batch work never takes the last slots: a realtime arrival must not wait for a
            # batch sequence to finish before it can even start.
            keep = 0 if waiting is self.waiting_realtime else options.realtime_slots
            while waiting and len(free) > keep:
                seq = waiting[0]
                if seq.job.cancelled:
                    waiting.popleft()
                    self._finish_cancelled(seq)
                    continue
                waiting.popleft()
                seq.sampler = sampler_chain(seq.job.request.params)
                self._place(seq)
                self.active.append(seq)

    def _place(self, seq: SequenceState) -> None:
        """Give ``seq`` a slot, starting from the longest prefix of its prompt whose KV is
        at hand: cached from a finished sequence (copied now) or being computed by a running
        one (copied once it is there)."""
        if not self.options.prefix_sharing:
            seq.slot = self.slots.take()
            return
        find_donor(seq, self.active)
        source, length = self.slots.longest_cached(seq.prompt)
        if length >= MIN_SHARED_PREFIX_TOKENS and length >= seq.share_len:
            seq.donor, seq.share_len = None, 0
            seq.slot = self.slots.take_cached(source, length)
            seq.n_past = seq.cached = length
            metrics.PREFIX_CACHE_HITS.inc()
            return
        seq.slot = self.slots.take()

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
                seq.job.fail(error)
        finally:
            for seq in [*self.active, *self.waiting_realtime, *self.waiting_batch]:
                seq.job.fail(EngineError("The engine stopped."))

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
            if seq is None:
                continue
            if not seq.realtime:
                self.waiting_batch.append(seq)
            elif job.request.urgent:
                # Priority-tier requests wait at the head, after earlier ones of their tier.
                ahead = sum(1 for s in self.waiting_realtime if s.job.request.urgent)
                self.waiting_realtime.insert(ahead, seq)
            else:
                self.waiting_realtime.append(seq)

    def _step(self) -> None:
        options = self.options
        batch = self.batch
        slots = self.slots
        for seq in [s for s in self.active if s.job.cancelled]:
            self._release(seq)
            self._finish_cancelled(seq)
        slots.compact(self.active)
        realtime_active = any(s.realtime for s in self.active)
        realtime_recent = time.monotonic() - self.last_realtime < REALTIME_GRACE_SECONDS
        budget = options.n_batch
        batch_prefill_budget = options.prefill_chunk if realtime_recent else options.n_batch
        n = 0
        batch_decoding = 0
        stepping: list[tuple[SequenceState, int]] = []  # (sequence, tokens it adds this step)

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
                slots.take_from_donor(seq, self.active)
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

    def _decode_failed(self, rc: int, stepping: list[tuple[SequenceState, int]]) -> None:
        # 1: no KV slot for this batch. Reservations make it unlikely; shed the youngest
        # batch sequence so the others can go on. Negative: an error; fail this step's work.
        log.error("llama_decode returned %s", rc, extra={"action": "decode_failed", "rc": rc})
        victims = [s for s, _ in stepping]
        if rc == 1:
            batch_seqs = [s for s in victims if not s.realtime]
            victims = batch_seqs[-1:] or victims[-1:]
        for seq in victims:
            self._release(seq)
            seq.job.fail(EngineError(f"The engine could not run this request (code {rc})."))

    def _on_token(self, seq: SequenceState, token: int) -> None:
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

    def _emit(self, seq: SequenceState, final: bool) -> None:
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
            seq.job.deliver(delta)

    # --------------------------------------------------------- endings

    def _release(self, seq: SequenceState, keep_kv: bool = False) -> None:
        """Take ``seq`` out of the step; with ``keep_kv`` (it finished) its KV may stay
        cached for later prompts that start the same way."""
        if seq in self.active:
            self.active.remove(seq)
            if keep_kv and seq.donor is None:
                held = (seq.prompt + seq.generated)[: seq.n_past]
                self.slots.release(seq.slot, held, loose=not seq.realtime)
            else:
                self.slots.release(seq.slot)
        if seq.sampler is not None:
            free_sampler(seq.sampler)
            seq.sampler = None

    def _finish(self, seq: SequenceState, reason: str, stop_sequence: str | None = None) -> None:
        self._release(seq, keep_kv=True)
        seq.text += (
            seq.decoder.decode(b"", final=True) if reason != "stop" or not stop_sequence else ""
        )
        request = seq.job.request
        metrics.count_tokens(
            request.model,
            len(seq.prompt),
            len(seq.generated),
            seq.cached,
            realtime=request.priority == Priority.REALTIME,
        )
        result = GenerationResult(
            text=seq.text,
            finish_reason="length" if reason == "length" else "stop",
            prompt_tokens=len(seq.prompt),
            # Sampled tokens, excluding the end-of-generation token that ended the reply.
            completion_tokens=len(seq.generated),
            cached_tokens=seq.cached,
            stop_sequence=stop_sequence,
            cache_prefix_tokens=seq.cache_marks,
        )
        if seq.job.deltas is not None:
            self._emit(seq, final=True)
        seq.job.complete(result)

    def _finish_cancelled(self, seq: SequenceState) -> None:
        seq.job.fail(asyncio.CancelledError())

    def close(self) -> None:
        self.stopping = True
        self.inbox.put(None)
        self.thread.join(timeout=30)
        for seq in list(self.active):
            self._release(seq)
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)
