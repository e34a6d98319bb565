"""Counts and usage: per batch (the pollers' caches never show a count taken under another
status), and over the whole database for the metrics."""

from __future__ import annotations

from batchd.store.records import BatchStatus, RequestOutcome, RequestState
from batchd.store.store import Store
from tests.unit.store.builders import add_batch, batch_values, finish_all


def test_counts_and_usage_of_a_batch(store: Store) -> None:
    add_batch(store, "batch_u", 4)
    leased = store.lease("worker-1", 3, lease_seconds=30)
    assert store.complete(
        leased[0], "worker-1", RequestOutcome(RequestState.SUCCEEDED, 200, b"{}", 10, 5, 2)
    )
    assert store.complete(
        leased[1], "worker-1", RequestOutcome(RequestState.SUCCEEDED, 200, b"{}", 1, 1, 1)
    )
    assert store.complete(
        leased[2], "worker-1", RequestOutcome(RequestState.ERRORED, 400, b"{}", 100, 100, 100)
    )
    counts = store.counts("batch_u")
    assert (counts.pending, counts.running, counts.succeeded, counts.errored) == (1, 0, 2, 1)
    assert (counts.total, counts.unfinished) == (4, 1)
    batch = store.get_batch("batch_u")
    assert batch is not None and batch.counts == counts
    usage = batch.usage
    assert (usage.input_tokens, usage.output_tokens, usage.cached_tokens) == (11, 6, 3), (
        "only succeeded rows' tokens"
    )
    assert store.has_unfinished("batch_u")
    finish_all(store)
    assert not store.has_unfinished("batch_u")
    assert not store.has_unfinished("batch_none")


def test_database_wide_counts_for_the_metrics(store: Store) -> None:
    assert store.request_state_counts() == {state.value: 0 for state in RequestState}
    assert store.batch_status_counts() == {}
    add_batch(store, "batch_a", 3)
    store.create_batch(batch_values("batch_b"))
    store.lease("worker-1", 1, lease_seconds=30)
    assert store.request_state_counts() == {
        "pending": 2,
        "running": 1,
        "succeeded": 0,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    assert store.batch_status_counts() == {"in_progress": 1, "validating": 1}


def test_pollers_share_a_recent_count_but_never_across_a_status_change(store: Store) -> None:
    add_batch(store, "batch_p", 3)
    polled = store.get_batch("batch_p", stats_max_age=3600)
    assert polled is not None and polled.counts.pending == 3
    leased = store.lease("worker-1", 1, lease_seconds=30)
    ok = RequestOutcome(RequestState.SUCCEEDED, 200, b'{"ok":1}', 3, 4, 0)
    assert store.complete(leased[0], "worker-1", ok)

    # A poller may see the count of up to stats_max_age ago; the scheduler's read counts now.
    stale = store.get_batch("batch_p", stats_max_age=3600)
    assert stale is not None and (stale.counts.pending, stale.counts.succeeded) == (3, 0)
    fresh = store.get_batch("batch_p")
    assert fresh is not None and (fresh.counts.pending, fresh.counts.succeeded) == (2, 1)
    assert fresh.usage.output_tokens == 4
    page, _ = store.list_batches("t", "openai", after=None, limit=10, stats_max_age=3600)
    assert page[0].counts.succeeded == 1, "a fresh count refreshes what pollers share"

    # A new status is always shown with counts taken under it.
    assert store.complete(store.lease("worker-1", 1, lease_seconds=30)[0], "worker-1", ok)
    assert store.transition("batch_p", [BatchStatus.IN_PROGRESS], BatchStatus.CANCELLING)
    cancelling = store.get_batch("batch_p", stats_max_age=3600)
    assert cancelling is not None and cancelling.counts.succeeded == 2


def test_an_ended_batch_s_counts_are_final_and_never_shared_by_reference(store: Store) -> None:
    add_batch(store, "batch_e", 2)
    finish_all(store)
    assert store.transition("batch_e", [BatchStatus.IN_PROGRESS], BatchStatus.FINALIZING)
    assert store.finalize(
        "batch_e", [BatchStatus.FINALIZING], BatchStatus.COMPLETED, [], None, None
    )
    first = store.get_batch("batch_e")
    assert first is not None and first.counts.succeeded == 2 and first.usage.output_tokens == 8
    first.counts.succeeded = 99  # a caller changing its record changes nobody else's
    first.usage.output_tokens = 99
    again = store.get_batch("batch_e", stats_max_age=3600)
    assert again is not None and again.counts.succeeded == 2 and again.usage.output_tokens == 8
    page, _ = store.list_batches("t", "openai", after=None, limit=10)
    assert page[0].counts.succeeded == 2 and page[0].status == BatchStatus.COMPLETED
