"""Fair share in the store, on both databases: finished work is counted per tenant, weights are
kept, and a lease slice is shared across tenants by them."""

from __future__ import annotations

from batchd.store.records import RequestOutcome, RequestState
from batchd.store.store import Store
from tests.unit.store.builders import add_batch


def _run(store: Store, owner: str, n: int, outcome: RequestOutcome) -> list[str]:
    """Lease ``n`` rows and finish them with ``outcome``: the batch of each, in lease order."""
    leased = store.lease(owner, n, lease_seconds=30)
    assert all(store.complete_many([(item, outcome) for item in leased], owner))
    return [item.batch_id for item in leased]


def test_finished_work_is_counted_per_tenant_in_engine_tokens(store: Store) -> None:
    add_batch(store, "batch_a", 3, tenant="a")
    # 10 prompt tokens of which 4 came from the cache, and 5 generated: 11 engine tokens.
    used = RequestOutcome(RequestState.SUCCEEDED, 200, b"{}", 10, 5, 4)
    assert _run(store, "w", 3, used) == ["batch_a"] * 3
    usage = store.tenant_usage(window=300)
    assert (usage["a"].tokens, usage["a"].rows) == (33, 3)
    assert store.prune_tenant_usage() == 0  # nothing is old yet
    assert store.tenant_usage(window=300)["a"].rows == 3


def test_weights_are_replaced_as_a_whole(store: Store) -> None:
    assert store.tenant_weights() == {}
    store.set_tenant_weights({"t_a": 2.0, "t_b": 0.5})
    assert store.tenant_weights() == {"t_a": 2.0, "t_b": 0.5}
    store.set_tenant_weights({"t_b": 3.0})
    assert store.tenant_weights() == {"t_b": 3.0}


def test_a_lease_serves_the_tenant_that_used_less_first(store: Store) -> None:
    # A's big batch is ahead by deadline and has been running; B's small one came later.
    add_batch(store, "batch_a", 200, tenant="a", expires_in=3600)
    work = RequestOutcome(RequestState.SUCCEEDED, 200, b"{}", 20, 10, 0)
    assert set(_run(store, "w", 50, work)) == {"batch_a"}  # alone: it gets everything
    add_batch(store, "batch_b", 10, tenant="b", expires_in=7200)
    leased = store.lease("w", 16, lease_seconds=30)
    assert [item.batch_id for item in leased] == ["batch_b"] * 10 + ["batch_a"] * 6
    assert {item.tenant for item in leased} == {"a", "b"}


def test_a_weight_buys_its_tenant_that_much_more_of_each_slice(store: Store) -> None:
    add_batch(store, "batch_a", 300, tenant="a")
    add_batch(store, "batch_b", 300, tenant="b")
    work = RequestOutcome(RequestState.SUCCEEDED, 200, b"{}", 20, 10, 0)
    store.set_tenant_weights({"a": 3.0})
    taken = [batch for _ in range(10) for batch in _run(store, "w", 8, work)]
    assert taken.count("batch_a") == 3 * taken.count("batch_b")


def test_rows_the_plan_cannot_claim_go_to_whoever_has_runnable_rows(store: Store) -> None:
    # B used nothing, so the plan gives it the slice, but its model's engine is full: the
    # slice is filled from A's rows rather than left empty.
    add_batch(store, "batch_a", 20, tenant="a")
    work = RequestOutcome(RequestState.SUCCEEDED, 200, b"{}", 20, 10, 0)
    _run(store, "w", 5, work)
    add_batch(store, "batch_b", 20, tenant="b", model="busy")
    leased = store.lease("w", 8, lease_seconds=30, skip_models=["busy"])
    assert [item.batch_id for item in leased] == ["batch_a"] * 8
