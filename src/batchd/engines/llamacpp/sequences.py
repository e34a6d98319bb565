"""Per-sequence state in a model's decode loop, the KV slots sequences live in, and prefix
sharing between them.

The KV cache is split into one stream per sequence (``kv_unified=False``, see engine.py), and
a sequence's slot is its llama.cpp sequence id, i.e. its stream. A shared prefix is copied
from its donor (a running sequence, or a finished one's KV kept in a free slot: the prefix
cache) cell by cell through llama.cpp's state API, and the copy's tail past the shared length
is removed.

Everything here runs on the model's decode thread, which owns the llama.cpp objects.
"""

from __future__ import annotations

import codecs
import ctypes
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from batchd.engines.base import Priority
from batchd.engines.llamacpp.jobs import Job
from batchd.errors import EngineError

# Share a prefix only when it saves at least this many tokens of prefill.
MIN_SHARED_PREFIX_TOKENS = 16


@dataclass(eq=False)
class SequenceState:
    job: Job
    slot: int
    prompt: list[int]
    max_new: int
    sampler: Any
    n_past: int = 0  # tokens whose KV is computed
    cached: int = 0  # prompt tokens copied from another sequence instead of computed
    cache_marks: tuple[int, ...] = ()  # the request's cache_prefixes, in prompt tokens
    donor: SequenceState | None = None  # waiting for this sequence to compute our prefix
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


class SlotTable:
    """The context's sequence ids: which are free, moving KV between them, and the prefix
    cache: free slots whose KV (a finished sequence's) is kept for later prompts.

    Active sequences keep the lowest slots and cached KV the highest: a step is built over
    every stream from its lowest to its highest sequence id, so a cached stream between
    active ones would cost as much as a live sequence. Any cached slot is given up (least
    recently used first) when a sequence needs a slot and no empty one is left, so the cache
    only ever uses KV memory no running sequence wants; and it holds at most ``cache_cells``
    cells in all (its memory budget), least recently used going first.

    KV moved up goes, where it can, to a slot that held KV before: its pages are resident,
    while every page of a slot never written must be faulted in (measured on this 2-core VM:
    a first copy into a fresh stream took 5-35 ms, a copy into a used one 1-2 ms).

    A finished *batch* sequence's KV is kept where it is, as a loose entry: batch lines share
    a system prompt but nobody continues one line's question and answer, so the next batch
    sequence starting with that prefix adopts the slot outright (no copy, the tail dropped),
    and one sharing nothing with it may take the slot rather than open a hole above it. A
    finished realtime sequence's KV is moved up and copied from when adopted, so a
    conversation's earlier turn stays whole for the follow-up that continues it.
    """

    def __init__(
        self,
        ctx: Any,
        memory: Any,
        max_seqs: int,
        cache: bool = False,
        cache_cells: int | None = None,  # None: no budget but the free slots
    ) -> None:
        self.ctx = ctx
        self.memory = memory
        self._buffer: ctypes.Array[ctypes.c_uint8] = (ctypes.c_uint8 * 0)()
        self.free = list(range(max_seqs - 1, -1, -1))
        self.cache = cache
        self.cache_cells = cache_cells if cache_cells is not None else 1 << 62
        # Free slots whose KV is kept: slot -> the tokens its cells hold, least recent first.
        self.cached: OrderedDict[int, list[int]] = OrderedDict()
        self.loose: set[int] = set()  # cached slots a newcomer may adopt whole (batch work's)
        self.warm: set[int] = set()  # slots that have held KV (their pages are resident)

    def copy(self, source: int, target: int) -> None:
        """``target`` (emptied first) gets the KV cells ``source`` holds, and only those.
        llama.cpp's own cross-stream copy (``llama_memory_seq_cp``) copies the whole stream,
        writing every page of ``target``'s stream, so pages no sequence ever wrote would
        become resident (see zero_pages.py); the state API copies the used cells alone."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, source)
        if len(self._buffer) < size:
            self._buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.ctx, self._buffer, size, source)
        if not written or not llama_cpp.llama_state_seq_set_data(
            self.ctx, self._buffer, written, target
        ):
            raise EngineError(f"could not copy the KV cells of sequence {source} to {target}")
        self.warm.add(target)

    def _empty(self) -> list[int]:
        return [slot for slot in self.free if slot not in self.cached]

    def take(self) -> int:
        empty = self._empty()
        loose = [s for s in self.loose if not empty or s < min(empty)]
        if loose:
            slot = min(loose)  # rather than open a hole above it, which compaction would fill
            self.evict(slot)
        elif empty:
            slot = min(empty)  # keep active slots low and contiguous
        else:
            slot = next(iter(self.cached))  # the least recently used cached prefix goes
            self.evict(slot)
        self.free.remove(slot)
        return slot

    def evict(self, slot: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, slot, -1, -1)
        del self.cached[slot]
        self.loose.discard(slot)

    def release(self, slot: int, tokens: list[int] | None = None, loose: bool = False) -> None:
        """Give ``slot`` back; with ``tokens`` (what its cells hold) and the cache on, its KV
        is kept: ``loose`` (a batch sequence's) where it is, else moved up to the highest
        empty slot when there is one above it."""
        self.free.append(slot)
        self.warm.add(slot)
        if (
            not self.cache
            or tokens is None
            or len(tokens) < MIN_SHARED_PREFIX_TOKENS
            or len(tokens) > self.cache_cells
        ):
            llama_cpp.llama_memory_seq_rm(self.memory, slot, -1, -1)
            return
        held = sum(len(kept) for kept in self.cached.values())
        while self.cached and held + len(tokens) > self.cache_cells:
            oldest = next(iter(self.cached))
            held -= len(self.cached[oldest])
            self.evict(oldest)
        if loose:
            self.cached[slot] = tokens
            self.loose.add(slot)
            return
        higher = [s for s in self._empty() if s > slot]
        if higher:
            warm = [s for s in higher if s in self.warm]
            target = max(warm or higher)
            self.copy(slot, target)
            llama_cpp.llama_memory_seq_rm(self.memory, slot, -1, -1)
            slot = target
        self.cached[slot] = tokens

    def longest_cached(self, prompt: list[int]) -> tuple[int, int]:
        """(slot, length) of the cached KV sharing the longest prefix with ``prompt`` (never
        its last token, which must be computed for its logits); (-1, 0) if none does."""
        best, best_len = -1, 0
        limit = len(prompt) - 1
        for slot, tokens in self.cached.items():
            n = common_prefix(tokens, prompt, limit)
            if n > best_len:
                best, best_len = slot, n
        return best, best_len

    def take_cached(self, source: int, length: int) -> int:
        """A slot for a new sequence holding the first ``length`` tokens of the cached
        ``source``'s KV: ``source`` itself when it is loose and no empty slot lies below it,
        or when no slot is empty; otherwise a copy into the lowest empty slot, so the cache
        keeps the entry for later prompts."""
        empty = self._empty()
        if empty and not (source in self.loose and min(empty) > source):
            slot = min(empty)
            self.free.remove(slot)
            self.copy(source, slot)
            self.cached.move_to_end(source)
        else:
            slot = source
            del self.cached[slot]
            self.loose.discard(slot)
            self.free.remove(slot)
        llama_cpp.llama_memory_seq_rm(self.memory, slot, length, -1)
        return slot

    def compact(self, active: list[SequenceState]) -> None:
        """Move sequences from high slots into holes left by finished ones.

        With one KV stream per sequence, llama.cpp builds each step over the range of streams
        from the lowest to the highest sequence id in the batch; holes in that range cost as
        much as live sequences (measured: 16 even-numbered sequences stepped 2x slower than 20
        contiguous ones). Moving a sequence copies the cells it holds (a few MB), then frees them.
        """
        n_active = len(active)
        holes = sorted(slot for slot in self.free if slot < n_active)
        if not holes:
            return
        movers = sorted((s for s in active if s.slot >= n_active), key=lambda s: -s.slot)
        for seq, hole in zip(movers, holes, strict=False):
            if hole in self.cached:  # a cached prefix inside the active range goes
                self.evict(hole)
            if seq.n_past > 0:
                self.copy(seq.slot, hole)
                llama_cpp.llama_memory_seq_rm(self.memory, seq.slot, -1, -1)
            self.free.remove(hole)
            self.free.append(seq.slot)
            seq.slot = hole

    def take_from_donor(self, seq: SequenceState, active: list[SequenceState]) -> None:
        """Copy ``seq``'s shared prefix from its donor once the donor has computed it."""
        donor = seq.donor
        assert donor is not None
        if donor not in active:  # the donor ended first: compute the prefix ourselves
            seq.donor = None
            return
        if donor.n_past < seq.share_len:
            return  # the donor is still computing the part we want
        # The donor's cells, then drop what is not shared.
        self.copy(donor.slot, seq.slot)
        llama_cpp.llama_memory_seq_rm(self.memory, seq.slot, seq.share_len, -1)
        seq.n_past = seq.cached = seq.share_len
        seq.donor = None


def find_donor(seq: SequenceState, active: list[SequenceState]) -> None:
    """Pick the active sequence whose KV (computed, or for batch work about to be) shares the
    longest prefix with ``seq``'s prompt, if that saves enough prefill."""
    best, best_len = None, 0
    prompt = seq.prompt
    for other in active:
        if other.donor is not None:
            continue
        if seq.realtime:
            # Only KV already computed: a realtime newcomer must not wait for a batch
            # sequence that steps aside while realtime work runs (that would deadlock).
            theirs = other.tokens
        else:
            theirs = other.prompt if other.prefilling else other.tokens
        n = common_prefix(theirs, prompt, len(prompt) - 1)  # our last token is always computed
        if n > best_len:
            best, best_len = other, n
    if best is not None and best_len >= MIN_SHARED_PREFIX_TOKENS:
        seq.donor, seq.share_len = best, best_len


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens ``a`` and ``b`` share, at most ``limit``."""
    n, limit = 0, min(limit, len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n
