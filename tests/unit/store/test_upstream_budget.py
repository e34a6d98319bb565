"""Upstream limits for a whole deployment, in the store, on both databases: slots leased to one
holder at a time and taken back when a lease lapses, and rate buckets that refill by the
clock."""

from __future__ import annotations

import pytest

from batchd.store.store import Store

KEY = "smol|http://up:8000/v1|slots"
AT = 1_000_000.0


def test_an_upstream_s_slots_go_to_one_holder_each_until_released(store: Store) -> None:
    store.ensure_upstream_slots(KEY, 2)
    store.ensure_upstream_slots(KEY, 2)  # idempotent
    first = store.acquire_upstream_slot(KEY, 2, "worker-a", 30, AT)
    second = store.acquire_upstream_slot(KEY, 2, "worker-b", 30, AT)
    assert {first, second} == {0, 1}
    assert store.acquire_upstream_slot(KEY, 2, "worker-c", 30, AT) is None  # all held
    assert first is not None
    store.release_upstream_slot(KEY, first, "worker-b")  # not its holder: nothing happens
    assert store.acquire_upstream_slot(KEY, 2, "worker-c", 30, AT) is None
    store.release_upstream_slot(KEY, first, "worker-a")
    assert store.acquire_upstream_slot(KEY, 2, "worker-c", 30, AT) == first


def test_a_lapsed_slot_comes_back_and_renewing_keeps_it(store: Store) -> None:
    store.ensure_upstream_slots(KEY, 1)
    assert store.acquire_upstream_slot(KEY, 1, "dead", 30, AT) == 0
    assert store.acquire_upstream_slot(KEY, 1, "alive", 30, AT + 10) is None
    assert store.renew_upstream_slots("dead", AT + 60) == 1  # it was alive after all
    assert store.acquire_upstream_slot(KEY, 1, "alive", 30, AT + 40) is None
    assert store.acquire_upstream_slot(KEY, 1, "alive", 30, AT + 61) == 0  # lapsed


def test_a_smaller_limit_hands_out_only_the_slots_below_it(store: Store) -> None:
    store.ensure_upstream_slots(KEY, 3)
    assert store.acquire_upstream_slot(KEY, 1, "a", 30, AT) == 0
    assert store.acquire_upstream_slot(KEY, 1, "b", 30, AT) is None


def test_a_rate_bucket_gives_what_it_holds_and_says_how_long_to_wait(store: Store) -> None:
    key = "smol|http://up:8000/v1|rpm"
    # Two a second, two at most at once.
    assert store.take_upstream_rate(key, 1, 2, 2, AT) == 0
    assert store.take_upstream_rate(key, 1, 2, 2, AT) == 0
    wait = store.take_upstream_rate(key, 1, 2, 2, AT)
    assert wait == pytest.approx(0.5)
    assert store.take_upstream_rate(key, 1, 2, 2, AT + 0.5) == 0  # refilled by the clock
    assert store.take_upstream_rate(key, 1, 2, 2, AT + 100) == 0  # never beyond capacity
    assert store.take_upstream_rate(key, 1, 2, 2, AT + 100) == 0
    assert store.take_upstream_rate(key, 1, 2, 2, AT + 100) > 0


def test_usage_beyond_an_estimate_is_debt_and_an_over_estimate_comes_back(store: Store) -> None:
    key = "smol|http://up:8000/v1|tpm"
    assert store.take_upstream_rate(key, 600, 1000, 10, AT) == 0  # 400 left
    store.adjust_upstream_rate(key, -500, 1000)  # used 500 more than estimated: -100
    assert store.take_upstream_rate(key, 100, 1000, 10, AT) == pytest.approx(20)
    store.adjust_upstream_rate(key, 5000, 1000)  # refunds never pass the capacity
    assert store.take_upstream_rate(key, 1000, 1000, 10, AT) == 0
