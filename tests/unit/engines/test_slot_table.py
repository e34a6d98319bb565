"""The prefix cache's rules in the slot table, with llama.cpp's KV calls recorded instead of
run: finished sequences' KV is kept in the highest empty slots, new sequences take the
lowest empty ones, a cached prefix is copied (or adopted when no slot is empty), and cached
slots go least recently used first, or when compaction needs them as holes."""

from __future__ import annotations

from typing import Any

import pytest

from batchd.engines.llamacpp import sequences
from batchd.engines.llamacpp.sequences import SlotTable

PREFIX = list(range(100, 140))  # 40 tokens, past the sharing minimum


class KVCalls:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def seq_rm(self, memory: object, seq: int, p0: int, p1: int) -> bool:
        self.calls.append(("rm", seq, p0))
        return True

    def copy(self, source: int, target: int) -> None:
        self.calls.append(("cp", source, target))


@pytest.fixture()
def kv(monkeypatch: pytest.MonkeyPatch) -> KVCalls:
    calls = KVCalls()
    monkeypatch.setattr(sequences.llama_cpp, "llama_memory_seq_rm", calls.seq_rm)
    monkeypatch.setattr(SlotTable, "copy", lambda self, source, target: calls.copy(source, target))
    return calls


def test_finished_kv_moves_to_the_highest_empty_slot_and_new_work_takes_the_lowest(
    kv: KVCalls,
) -> None:
    slots = SlotTable(ctx=None, memory=None, max_seqs=4, cache=True)
    first = slots.take()
    assert first == 0
    slots.release(first, [*PREFIX, 1, 2])
    assert kv.calls == [("cp", 0, 3), ("rm", 0, -1)]
    assert dict(slots.cached) == {3: [*PREFIX, 1, 2]}
    assert slots.take() == 0  # an empty slot before any cached one


def test_a_cached_prefix_is_found_and_copied_keeping_the_cache_entry(kv: KVCalls) -> None:
    slots = SlotTable(ctx=None, memory=None, max_seqs=4, cache=True)
    slots.release(slots.take(), [*PREFIX, 7])
    prompt = [*PREFIX, 8, 9]
    source, length = slots.longest_cached(prompt)
    assert (source, length) == (3, len(PREFIX))
    kv.calls.clear()
    slot = slots.take_cached(source, length)
    assert slot == 0 and kv.calls == [("cp", 3, 0), ("rm", 0, len(PREFIX))]
    assert 3 in slots.cached and 0 not in slots.free
    # The whole prompt never counts: its last token must be computed for its logits.
    assert slots.longest_cached(PREFIX[:20])[1] == 19


def test_with_no_empty_slot_the_cached_one_is_adopted_and_the_lru_one_evicted(
    kv: KVCalls,
) -> None:
    slots = SlotTable(ctx=None, memory=None, max_seqs=2, cache=True)
    a, b = slots.take(), slots.take()
    slots.release(a, [*PREFIX, 1])  # no empty slot above 0 is left: cached in place
    slots.release(b, [5] * 30)
    assert list(slots.cached) == [0, 1]
    kv.calls.clear()
    assert slots.take_cached(0, len(PREFIX)) == 0  # adopted: no copy, the tail dropped
    assert kv.calls == [("rm", 0, len(PREFIX))] and list(slots.cached) == [1]
    kv.calls.clear()
    slots.release(0, [*PREFIX, 2])
    assert slots.take() == 1  # no empty slot: the least recently used cached one goes
    assert kv.calls == [("rm", 1, -1)] and list(slots.cached) == [0]


def test_short_or_unwanted_kv_is_not_kept(kv: KVCalls) -> None:
    slots = SlotTable(ctx=None, memory=None, max_seqs=3, cache=True)
    slots.release(slots.take(), [1, 2, 3])  # shorter than a prefix worth sharing
    slots.release(slots.take(), None)  # a cancelled or failed sequence
    off = SlotTable(ctx=None, memory=None, max_seqs=3, cache=False)
    off.release(off.take(), PREFIX)
    assert not slots.cached and not off.cached
    assert all(call[0] == "rm" for call in kv.calls)


def test_compaction_gives_up_a_cached_slot_inside_the_active_range(kv: KVCalls) -> None:
    slots = SlotTable(ctx=None, memory=None, max_seqs=4, cache=True)
    taken = [slots.take() for _ in range(4)]
    assert taken == [0, 1, 2, 3]
    slots.release(1, PREFIX)  # no empty slot above: cached in place, inside the active range
    assert list(slots.cached) == [1]

    class Seq:
        def __init__(self, slot: int) -> None:
            self.slot, self.n_past = slot, 5

    active = [Seq(0), Seq(2), Seq(3)]
    kv.calls.clear()
    slots.compact(active)  # type: ignore[arg-type]
    assert [s.slot for s in active] == [0, 2, 1]
    assert kv.calls[0] == ("rm", 1, -1) and ("cp", 3, 1) in kv.calls
    assert not slots.cached


def test_the_cache_keeps_within_its_budget_of_cells_least_recent_going_first(
    kv: KVCalls,
) -> None:
    budget = 2 * len(PREFIX) + 5  # room for two 41-token entries, not three
    slots = SlotTable(ctx=None, memory=None, max_seqs=8, cache=True, cache_cells=budget)
    for tail in (1, 2, 3):
        slots.release(slots.take(), [*PREFIX, tail])
    assert [tokens[-1] for tokens in slots.cached.values()] == [2, 3]  # the first went
    assert sum(len(t) for t in slots.cached.values()) <= budget
    kv.calls.clear()
    slots.release(slots.take(), list(range(budget + 1)))  # larger than the whole budget
    assert kv.calls[-1] == ("rm", 0, -1) and len(slots.cached) == 2  # not kept, none evicted


def test_kv_moves_into_a_slot_that_held_kv_before_rather_than_a_fresh_one(
    kv: KVCalls,
) -> None:
    # Slot 3 held KV earlier (its pages are resident); 4-7 never did. A finished sequence's
    # KV moves up into 3, not into the higher but fresh 7.
    slots = SlotTable(ctx=None, memory=None, max_seqs=8, cache=True)
    slots.warm.add(3)
    slots.release(slots.take(), [*PREFIX, 1])
    assert kv.calls[0] == ("cp", 0, 3) and list(slots.cached) == [3]
    kv.calls.clear()
    slots.release(slots.take(), [*PREFIX, 2])  # no used slot above is empty: the highest
    assert kv.calls[0] == ("cp", 0, 7)


def test_a_batch_sequence_s_kv_stays_in_place_and_the_next_batch_sequence_adopts_it(
    kv: KVCalls,
) -> None:
    slots = SlotTable(ctx=None, memory=None, max_seqs=8, cache=True)
    lines = [slots.take() for _ in range(3)]
    for tail, slot in zip((1, 2, 3), lines, strict=True):
        slots.release(slot, [*PREFIX, tail], loose=True)
    assert kv.calls == [] and list(slots.cached) == [0, 1, 2]  # nothing copied
    source, length = slots.longest_cached([*PREFIX, 9, 9])
    slot = slots.take_cached(source, length)
    assert slot == source == 0  # adopted: the tail dropped, no copy
    assert kv.calls == [("rm", 0, len(PREFIX))] and list(slots.cached) == [1, 2]
    kv.calls.clear()
    assert slots.take() == 1  # sharing nothing: the lowest loose slot, not a hole above it
    assert kv.calls == [("rm", 1, -1)] and list(slots.cached) == [2]


def test_a_loose_entry_above_an_empty_slot_is_copied_down_and_kept(kv: KVCalls) -> None:
    slots = SlotTable(ctx=None, memory=None, max_seqs=8, cache=True)
    a, b = slots.take(), slots.take()
    slots.release(b, [*PREFIX, 1], loose=True)  # kept in slot 1
    slots.release(a)  # slot 0 empty, below it
    slot = slots.take_cached(1, len(PREFIX))
    assert slot == 0 and kv.calls[-2:] == [("cp", 1, 0), ("rm", 0, len(PREFIX))]
    assert list(slots.cached) == [1]
