"""The runner: leasing order, committing results once under the lease, cancel, expiry, crash
recovery, the fence against stale results, and draining.

Tests of scheduling logic on the fake engine: a ``Scheduler`` on a temporary SQLite store and
the directory blob store, its engine a fake that answers at once (``RecordingEngine``) or holds
each request until the test lets it go (``GatedEngine``). No model, no HTTP, no subprocess.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from batchd.clock import now
from batchd.scheduler.runner import Scheduler
from batchd.store.records import BatchStatus, LeasedRequest, RequestOutcome, RequestState
from tests.unit.scheduler.conftest import (
    GatedEngine,
    Harness,
    RecordingEngine,
    chat_line,
    chat_row,
    drain,
    run_to_drained,
    wait_until,
)

CommitLog = list[tuple[int, str, int, bool]]


@pytest.fixture()
def commits(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> CommitLog:
    """Every result commit the store is asked for: (seq, owner, epoch, whether it was taken)."""
    log: CommitLog = []
    complete_many = harness.store.complete_many

    def spy(finished: Sequence[tuple[LeasedRequest, RequestOutcome]], owner: str) -> list[bool]:
        taken = complete_many(finished, owner)
        log.extend(
            (leased.seq, owner, leased.epoch, ok)
            for (leased, _), ok in zip(finished, taken, strict=True)
        )
        return taken

    monkeypatch.setattr(harness.store, "complete_many", spy)
    return log


async def _start(harness: Harness, engine: GatedEngine) -> tuple[Scheduler, asyncio.Task[None]]:
    """A scheduler running (not draining) in the background, with one row in the engine."""
    scheduler = harness.scheduler(engine)
    task = asyncio.create_task(scheduler.run())
    await asyncio.wait_for(engine.started.wait(), 5)
    return scheduler, task


async def _stop(scheduler: Scheduler, task: asyncio.Task[None]) -> None:
    await scheduler.stop()
    await asyncio.wait_for(task, 5)


# ------------------------------------------------------------------------------ leasing


def test_rows_are_leased_earliest_deadline_first(harness: Harness) -> None:
    # The later deadline is created first and has the smaller id: neither decides the order.
    harness.open_batch(
        [chat_row(1, "l1", "late-1"), chat_row(2, "l2", "late-2")],
        batch_id="batch_a_late",
        expires_in=7200,
    )
    harness.open_batch(
        [chat_row(1, "s1", "soon-1"), chat_row(2, "s2", "soon-2")],
        batch_id="batch_z_soon",
        expires_in=600,
    )
    engine = RecordingEngine(capacity=1)  # one row per lease: the engine sees the lease order

    run_to_drained(harness.scheduler(engine))

    assert engine.seen == ["soon-1", "soon-2", "late-1", "late-2"]


def test_rows_sharing_a_prompt_prefix_are_leased_together_in_line_order(
    harness: Harness,
) -> None:
    systems = {1: "rules A", 2: "rules B", 3: "rules A", 4: "rules B", 5: "rules A"}
    rows = [chat_row(n, f"c{n}", f"q{n}", system=s) for n, s in systems.items()]
    harness.open_batch(rows)
    engine = RecordingEngine(capacity=1)

    run_to_drained(harness.scheduler(engine))

    expected = [f"q{r.line_no}" for r in sorted(rows, key=lambda r: (r.prefix_key, r.line_no))]
    assert expected in (["q1", "q3", "q5", "q2", "q4"], ["q2", "q4", "q1", "q3", "q5"])
    assert engine.seen == expected


# ------------------------------------------------------------------------------ results


def test_a_finished_row_is_committed_exactly_once(harness: Harness, commits: CommitLog) -> None:
    batch_id = harness.open_batch([chat_row(n, f"c{n}", f"hello {n}") for n in range(1, 6)])
    scheduler = harness.scheduler()

    run_to_drained(scheduler)

    rows = harness.rows(batch_id)
    assert [r.state for r in rows] == [RequestState.SUCCEEDED.value] * 5
    assert sorted(seq for seq, _, _, _ in commits) == sorted(r.seq for r in rows)
    assert all(owner == scheduler.owner and taken for _, owner, _, taken in commits)
    assert all(r.attempts == 1 and r.lease_owner is None for r in rows)
    # The same lease cannot write the row again once it is final.
    leased = LeasedRequest(rows[0].seq, batch_id, 1, "c1", b"{}", 1, "/v1/chat/completions")
    again = RequestOutcome(RequestState.ERRORED, 500, b'{"late":true}')
    assert not harness.store.complete(leased, scheduler.owner, again)
    assert harness.rows(batch_id)[0].result == rows[0].result


# ------------------------------------------------------------------------ cancel, expiry


def test_cancel_ends_pending_rows_as_canceled_and_keeps_finished_ones(harness: Harness) -> None:
    batch_id = harness.open_batch([chat_row(n, f"c{n}", f"q{n}") for n in range(1, 5)])
    done = harness.finish_elsewhere(batch_id, 1, b'{"kept":true}')
    assert done == [1]

    async def scenario() -> None:
        engine = GatedEngine()
        scheduler, task = await _start(harness, engine)  # line 2 is now in the engine
        assert harness.store.transition(batch_id, [BatchStatus.IN_PROGRESS], BatchStatus.CANCELLING)
        scheduler.wake()
        await wait_until(
            lambda: harness.batch(batch_id).status == BatchStatus.CANCELLED, what="cancelled"
        )
        await _stop(scheduler, task)
        assert engine.seen == ["q2"]  # lines 3 and 4 never ran

    asyncio.run(scenario())

    rows = harness.rows(batch_id)
    assert [r.state for r in rows] == ["succeeded", "canceled", "canceled", "canceled"]
    assert rows[0].result == b'{"kept":true}'
    assert all(r.lease_owner is None and r.finished_at is not None for r in rows)


def test_expiry_ends_unfinished_rows_as_expired_and_keeps_finished_ones(
    harness: Harness,
) -> None:
    batch_id = harness.open_batch([chat_row(n, f"c{n}", f"q{n}") for n in range(1, 4)])
    harness.finish_elsewhere(batch_id, 1, b'{"kept":true}')
    harness.set_deadline(batch_id, now() - 1)
    engine = RecordingEngine()

    run_to_drained(harness.scheduler(engine))

    assert engine.seen == []  # an overdue batch's rows are not started
    assert [r.state for r in harness.rows(batch_id)] == ["succeeded", "expired", "expired"]
    assert harness.batch(batch_id).status == BatchStatus.EXPIRED


def test_expiry_stops_a_running_row_and_ends_it_expired(harness: Harness) -> None:
    batch_id = harness.open_batch([chat_row(n, f"c{n}", f"q{n}") for n in range(1, 3)])

    async def scenario() -> None:
        engine = GatedEngine()
        scheduler, task = await _start(harness, engine)
        harness.set_deadline(batch_id, now() - 1)
        scheduler.wake()
        await wait_until(
            lambda: harness.batch(batch_id).status == BatchStatus.EXPIRED, what="expired"
        )
        await _stop(scheduler, task)

    asyncio.run(scenario())

    rows = harness.rows(batch_id)
    assert [r.state for r in rows] == ["expired", "expired"]
    assert all(r.result is None and r.lease_owner is None for r in rows)


# ---------------------------------------------------------------- recovery and fencing


def test_recover_requeues_rows_left_running_by_a_dead_owner(harness: Harness) -> None:
    batch_id = harness.open_batch([chat_row(n, f"c{n}", f"q{n}") for n in range(1, 4)])
    assert len(harness.store.lease("dead-worker", 2, 60)) == 2
    orphan = harness.blobs.new_writer()  # a blob written by a crash between write and commit
    orphan.write(b"partial")
    orphan_name = orphan.commit()
    scheduler = harness.scheduler()

    asyncio.run(scheduler.recover())

    rows = harness.rows(batch_id)
    assert [r.state for r in rows] == ["pending"] * 3
    assert all(r.lease_owner is None and r.lease_expires_at is None for r in rows)
    assert not harness.blobs.path(orphan_name).exists()

    run_to_drained(scheduler)

    rows = harness.rows(batch_id)
    assert [r.state for r in rows] == ["succeeded"] * 3
    assert [r.attempts for r in rows] == [2, 2, 1]  # leased by the dead worker, then by us


def test_a_lost_lease_never_commits_its_stale_result(harness: Harness, commits: CommitLog) -> None:
    """The scheduler stalls on a row past its lease; another worker re-leases the row and
    finishes it. When the stalled request ends, its commit is refused (owner and epoch fence)
    and the other worker's answer is the one the batch reports."""
    batch_id = harness.open_batch([chat_row(1, "only", "slow")])
    theirs = RequestOutcome(RequestState.SUCCEEDED, 200, b'{"from":"other-worker"}', 1, 1, 0)

    async def scenario() -> None:
        engine = GatedEngine()
        scheduler, task = await _start(harness, engine)
        # The lease lapses (as if the scheduler stalled) and the sweep of another worker
        # requeues the row, which that worker then leases with a newer epoch.
        assert harness.store.requeue_running(lapsed_before=now() + 3600) == 1
        (other,) = harness.store.lease("other-worker", 1, 60)
        assert other.epoch == 2
        assert harness.store.complete(other, "other-worker", theirs)
        engine.gate.set()  # the stalled request finishes and tries to commit
        await wait_until(lambda: any(o == scheduler.owner for _, o, _, _ in commits))
        await wait_until(
            lambda: harness.batch(batch_id).status == BatchStatus.COMPLETED, what="completed"
        )
        await _stop(scheduler, task)
        ours = [c for c in commits if c[1] == scheduler.owner]
        assert ours == [(other.seq, scheduler.owner, 1, False)]

    asyncio.run(scenario())

    (row,) = harness.rows(batch_id)
    assert (row.state, row.result) == ("succeeded", b'{"from":"other-worker"}')
    output = harness.read_jsonl(harness.batch(batch_id).output_file_id)
    assert [line["response"]["body"] for line in output] == [{"from": "other-worker"}]


# ------------------------------------------------------------------------------ drain


def test_drain_returns_at_once_when_there_is_no_work(harness: Harness) -> None:
    scheduler = harness.scheduler()

    async def timed() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await drain(scheduler, timeout=5)
        return loop.time() - started

    assert asyncio.run(timed()) < 2.0
    assert scheduler.idle()


def test_drain_returns_only_once_every_batch_has_ended(harness: Harness) -> None:
    """A file still to validate, and a batch already open: draining validates the first,
    runs both, finalizes both, and only then returns."""
    validating = harness.openai_batch(
        harness.upload([chat_line(f"v{n}", f"v {n}") for n in range(1, 4)])
    )
    running = harness.open_batch([chat_row(n, f"r{n}", f"r {n}") for n in range(1, 4)])
    engine = RecordingEngine(capacity=2)

    run_to_drained(harness.scheduler(engine))

    assert len(engine.seen) == 6
    for batch_id in (validating, running):
        batch = harness.batch(batch_id)
        assert batch.status == BatchStatus.COMPLETED
        assert (batch.counts.succeeded, batch.counts.unfinished) == (3, 0)
