"""The queue: rows inserted under a validation claim, leased in deadline and prompt-prefix
order, fenced by owner and epoch, kept by heartbeats, and completed, released or ended."""

from __future__ import annotations

from batchd.clock import now
from batchd.store.records import BatchStatus, RequestLine, RequestOutcome, RequestState
from batchd.store.store import Store
from tests.unit.store.builders import OK, add_batch, batch_values, lines

# ------------------------------------------------------------------- inserting rows


def test_one_worker_at_a_time_holds_a_batch_s_validation_claim(store: Store) -> None:
    store.create_batch(batch_values("batch_v"))
    assert store.claim_validation("batch_v", "worker-1", 60)
    assert store.claim_validation("batch_v", "worker-1", 60), "its holder renews it"
    assert not store.claim_validation("batch_v", "worker-2", 60), "held by another"
    assert store.claim_validation("batch_v", "worker-1", -5)  # renewed into the past: lapsed
    assert store.claim_validation("batch_v", "worker-2", 60), "a lapsed claim is taken over"
    assert store.transition("batch_v", [BatchStatus.VALIDATING], BatchStatus.IN_PROGRESS)
    assert not store.claim_validation("batch_v", "worker-2", 60), "only while validating"


def test_rows_go_in_only_while_their_inserter_holds_the_claim(store: Store) -> None:
    store.create_batch(batch_values("batch_c"))
    assert store.claim_validation("batch_c", "worker-1", 60)
    assert store.insert_requests("batch_c", lines(2), claim=("worker-1", 60))
    assert not store.insert_requests(
        "batch_c", [RequestLine(3, "c2", b"{}", "m", "k")], claim=("worker-2", 60)
    ), "a worker that does not hold the claim inserts nothing"
    assert store.counts("batch_c").pending == 2
    # The claim lapses and worker-2 takes it over: worker-1's next chunk is refused.
    assert store.claim_validation("batch_c", "worker-1", -5)
    assert store.claim_validation("batch_c", "worker-2", 60)
    assert not store.insert_requests(
        "batch_c", [RequestLine(3, "c2", b"{}", "m", "k")], claim=("worker-1", 60)
    )
    assert store.counts("batch_c").total == 2


def test_rows_go_in_without_a_claim_and_an_empty_chunk_is_a_no_op(store: Store) -> None:
    assert store.insert_requests("batch_n", [])
    store.create_batch(batch_values("batch_n"))
    assert store.insert_requests("batch_n", lines(3))
    assert store.counts("batch_n").pending == 3
    store.delete_requests("batch_n")
    assert store.counts("batch_n").total == 0


# ------------------------------------------------------------------------- leasing


def test_lease_complete_and_fencing(store: Store) -> None:
    add_batch(store, "batch_a", 3)
    leased = store.lease("worker-1", 2, lease_seconds=30)
    assert [r.line_no for r in leased] == [1, 2]
    assert store.counts("batch_a").running == 2

    ok = RequestOutcome(RequestState.SUCCEEDED, 200, b'{"ok":1}', 3, 4, 0)
    assert store.complete(leased[0], "worker-1", ok)
    assert not store.complete(leased[0], "worker-1", ok), "a final row is never written twice"
    assert not store.complete(leased[1], "worker-2", ok), "only the lease holder may write"

    # The lease lapses and another worker takes the row: the first worker's epoch is stale.
    assert store.requeue_running(lapsed_before=now() + 60) == 1
    again = store.lease("worker-2", 5, lease_seconds=30)
    assert {r.line_no for r in again} == {2, 3}
    assert not store.complete(leased[1], "worker-1", ok)
    fresh = next(r for r in again if r.line_no == 2)
    assert fresh.epoch == leased[1].epoch + 1
    assert store.complete(fresh, "worker-2", ok)
    counts = store.counts("batch_a")
    assert (counts.succeeded, counts.running) == (2, 1)


def test_the_epoch_fences_the_same_worker_after_its_own_lease_lapsed(store: Store) -> None:
    """The owner alone is not the fence: a worker that stalled past its lease and then got the
    same row again holds a newer epoch, and its stale task must not write with the old one."""
    add_batch(store, "batch_e", 1)
    (first,) = store.lease("worker-1", 1, lease_seconds=30)
    assert store.requeue_running(lapsed_before=now() + 60) == 1
    (second,) = store.lease("worker-1", 1, lease_seconds=30)
    assert (second.seq, second.epoch) == (first.seq, first.epoch + 1)
    assert store.held_leases("worker-1") == {(second.seq, second.epoch)}
    ok = RequestOutcome(RequestState.SUCCEEDED, 200, b'{"ok":1}', 3, 4, 0)
    assert not store.release(first, "worker-1", 0), "a stale epoch cannot hand the row back"
    assert not store.complete(first, "worker-1", ok), "a stale epoch cannot write a result"
    assert store.complete(second, "worker-1", ok)
    assert store.counts("batch_e").succeeded == 1


def test_a_leased_row_carries_its_batch_s_endpoint_and_deadline(store: Store) -> None:
    add_batch(store, "batch_l", 1)
    (item,) = store.lease("worker-1", 1, lease_seconds=30)
    batch = store.get_batch("batch_l")
    assert batch is not None
    assert (item.batch_id, item.line_no, item.custom_id, item.body) == ("batch_l", 1, "c0", b"{}")
    assert (item.endpoint, item.expires_at) == (batch.endpoint, batch.expires_at)
    assert (item.epoch, item.upstream_attempts) == (1, 0)
    assert store.lease("worker-1", 0, lease_seconds=30) == []
    assert store.lease("worker-1", 5, lease_seconds=30) == [], "nothing pending is left"


def test_rows_sharing_a_prompt_prefix_are_leased_together(store: Store) -> None:
    store.create_batch(batch_values("batch_x"))
    prefixes = ["b", "a", "b", "a", "c"]
    rows = [RequestLine(i + 1, f"c{i}", b"{}", "m", p) for i, p in enumerate(prefixes)]
    store.insert_requests("batch_x", rows)
    assert store.transition("batch_x", [BatchStatus.VALIDATING], BatchStatus.IN_PROGRESS)
    first = store.lease("worker-1", 2, lease_seconds=30)
    assert [r.line_no for r in first] == [2, 4]  # prefix "a", in input order
    second = store.lease("worker-1", 3, lease_seconds=30)
    assert [r.line_no for r in second] == [1, 3, 5]


def test_the_earliest_deadline_s_batch_is_leased_first(store: Store) -> None:
    add_batch(store, "batch_late", 2, expires_in=7200)
    add_batch(store, "batch_soon", 2, expires_in=600)
    leased = store.lease("worker-1", 3, lease_seconds=30)
    assert [(r.batch_id, r.line_no) for r in leased] == [
        ("batch_soon", 1),
        ("batch_soon", 2),
        ("batch_late", 1),
    ]  # taken and returned soonest deadline first: the order the engine starts them in


def test_a_slice_comes_back_in_prefix_order_across_its_batches(store: Store) -> None:
    store.create_batch(batch_values("batch_soon", expires_in=600))
    prefixes = ["b", "a", "b", "a"]
    store.insert_requests(
        "batch_soon", [RequestLine(i + 1, f"c{i}", b"{}", "m", p) for i, p in enumerate(prefixes)]
    )
    assert store.transition("batch_soon", [BatchStatus.VALIDATING], BatchStatus.IN_PROGRESS)
    add_batch(store, "batch_late", 2, expires_in=7200)
    leased = store.lease("worker-1", 10, lease_seconds=30)
    assert [(r.batch_id, r.line_no) for r in leased] == [
        ("batch_soon", 2),
        ("batch_soon", 4),
        ("batch_soon", 1),
        ("batch_soon", 3),
        ("batch_late", 1),
        ("batch_late", 2),
    ]


def test_only_running_batches_are_leased_from(store: Store) -> None:
    store.create_batch(batch_values("batch_validating"))
    store.insert_requests("batch_validating", lines(2))
    add_batch(store, "batch_cancelling", 2)
    assert store.transition("batch_cancelling", [BatchStatus.IN_PROGRESS], BatchStatus.CANCELLING)
    assert store.lease("worker-1", 10, lease_seconds=30) == []


def test_lease_skips_the_models_it_is_told_to(store: Store) -> None:
    add_batch(store, "batch_busy", 2, model="busy", expires_in=600)
    add_batch(store, "batch_free", 2, model="free", expires_in=7200)
    leased = store.lease("worker-1", 10, lease_seconds=30, skip_models=["busy"])
    assert {r.batch_id for r in leased} == {"batch_free"} and len(leased) == 2
    assert store.lease("worker-1", 10, lease_seconds=30, skip_models=["busy", "free"]) == []
    assert {r.batch_id for r in store.lease("worker-1", 10, lease_seconds=30)} == {"batch_busy"}


# ------------------------------------------------------------------ heartbeats


def test_heartbeats_held_leases_and_a_clean_stop(store: Store) -> None:
    add_batch(store, "batch_h", 4)
    mine = store.lease("worker-1", 3, lease_seconds=1)
    theirs = store.lease("worker-2", 1, lease_seconds=30)
    assert store.renew_leases("worker-1", 600) == 3
    assert store.requeue_running(lapsed_before=now() + 60) == 1, "only worker-2's lapsed"
    assert store.held_leases("worker-1") == {(r.seq, r.epoch) for r in mine}
    assert store.held_leases("worker-2") == set()
    assert store.release_owned("worker-1") == 3
    assert store.held_leases("worker-1") == set()
    counts = store.counts("batch_h")
    assert (counts.pending, counts.running) == (4, 0)
    assert store.renew_leases("worker-1", 600) == 0
    assert not store.complete(theirs[0], "worker-2", OK)


def test_requeue_without_a_cutoff_returns_every_running_row(store: Store) -> None:
    add_batch(store, "batch_r", 3)
    store.lease("worker-1", 2, lease_seconds=600)
    store.lease("worker-2", 1, lease_seconds=600)
    assert store.requeue_running(lapsed_before=now()) == 0
    assert store.requeue_running() == 3
    assert store.counts("batch_r").pending == 3


def test_a_released_row_keeps_its_upstream_attempts(store: Store) -> None:
    add_batch(store, "batch_u", 1)
    (first,) = store.lease("worker-1", 1, lease_seconds=30)
    assert store.release(first, "worker-1", upstream_attempts=2)
    assert not store.release(first, "worker-1", upstream_attempts=3), "released once"
    (again,) = store.lease("worker-2", 1, lease_seconds=30)
    assert (again.epoch, again.upstream_attempts) == (first.epoch + 1, 2)


# ------------------------------------------------------------------ ending rows


def test_a_worker_ends_only_its_own_running_rows(store: Store) -> None:
    """Cancel and expiry across workers: each worker ends the rows it holds (after stopping
    their tasks); another worker's rows stay running until that worker stops them."""
    add_batch(store, "batch_o", 4)
    mine = store.lease("worker-1", 2, lease_seconds=30)
    theirs = store.lease("worker-2", 2, lease_seconds=30)
    assert store.end_running("batch_o", RequestState.CANCELED, "worker-1") == 2
    counts = store.counts("batch_o")
    assert (counts.canceled, counts.running) == (2, 2)
    assert store.held_leases("worker-2") == {(r.seq, r.epoch) for r in theirs}
    assert store.held_leases("worker-1") == set()
    assert not store.complete(
        mine[0], "worker-1", RequestOutcome(RequestState.SUCCEEDED, 200, b"{}", 1, 1, 0)
    )


def test_end_pending_ends_only_the_rows_not_started(store: Store) -> None:
    add_batch(store, "batch_p", 3)
    running = store.lease("worker-1", 2, lease_seconds=30)
    add_batch(store, "batch_other", 1)
    assert store.end_pending("batch_p", RequestState.EXPIRED) == 1
    counts = store.counts("batch_p")
    assert (counts.expired, counts.running, counts.pending) == (1, 2, 0)
    assert store.counts("batch_other").pending == 1, "another batch's rows are not ended"
    assert store.complete(running[0], "worker-1", OK), "a running row is not ended by it"


def test_finished_rows_stream_in_input_order(store: Store) -> None:
    add_batch(store, "batch_f", 5)
    leased = store.lease("worker-1", 5, lease_seconds=30)
    for item in leased[:3]:
        assert store.complete(item, "worker-1", OK)
    assert store.end_running("batch_f", RequestState.CANCELED, "worker-1") == 2
    rows = list(store.iter_finished("batch_f", chunk=2))
    assert [r.line_no for r in rows] == [1, 2, 3, 4, 5]
    assert [r.state for r in rows] == [RequestState.SUCCEEDED] * 3 + [RequestState.CANCELED] * 2
    assert rows[0].custom_id == "c0" and rows[0].status_code == 200
    assert rows[0].result == b'{"ok":1}' and rows[4].result is None
    assert list(store.iter_finished("batch_none")) == []


def test_complete_many_commits_a_group_and_fences_each_row_on_its_own(store: Store) -> None:
    add_batch(store, "batch_g", 4)
    leased = store.lease("worker-1", 4, lease_seconds=30)
    assert store.complete(leased[3], "worker-1", OK)
    group = [(leased[0], OK), (leased[3], OK), (leased[1], OK)]
    # Row 4 is final already: only that row is refused, the others of the group are written.
    assert store.complete_many(group, "worker-1") == [True, False, True]
    assert store.complete_many([(leased[2], OK)], "worker-2") == [False]
    counts = store.counts("batch_g")
    assert (counts.succeeded, counts.running) == (3, 1)
    assert store.complete_many([], "worker-1") == []
