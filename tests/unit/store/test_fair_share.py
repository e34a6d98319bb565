"""fair_share.plan, rule by rule: who the next lease slice's rows come from."""

from __future__ import annotations

from batchd.store.fair_share import Candidate, Recent, Usage, at_risk, plan

AT = 1_000_000
DAY = 24 * 3600


def rows_of(planned: list[tuple[str, int]]) -> dict[str, int]:
    return dict(planned)


def test_a_tenant_alone_gets_every_row_in_deadline_order() -> None:
    candidates = [Candidate("late", "a", AT + 2 * DAY, 50), Candidate("early", "a", AT + DAY, 5)]
    assert plan(20, candidates, {}, Recent(), AT) == [("early", 5), ("late", 15)]


def test_a_tenant_that_queued_little_is_not_behind_one_that_queued_much() -> None:
    # A has run lately and still has 2,000 rows queued; B just came with 20 and a later
    # deadline. B's rows come first, then A's take the rest of the slice.
    candidates = [Candidate("a1", "a", AT + DAY, 2000), Candidate("b1", "b", AT + DAY + 2, 20)]
    recent = Recent(usage={"a": Usage(tokens=30_000, rows=1000)}, seconds=60)
    assert plan(64, candidates, {}, recent, AT) == [("b1", 20), ("a1", 44)]


def test_equal_tenants_split_a_slice_evenly_and_weights_split_it_by_weight() -> None:
    candidates = [Candidate("a1", "a", AT + DAY, 500), Candidate("b1", "b", AT + DAY, 500)]
    recent = Recent(
        usage={"a": Usage(tokens=1000, rows=100), "b": Usage(tokens=1000, rows=100)}, seconds=60
    )
    assert rows_of(plan(30, candidates, {}, recent, AT)) == {"a1": 15, "b1": 15}
    weighted = rows_of(plan(30, candidates, {"a": 2.0}, recent, AT))
    # a has weight 2: its 1,000 tokens count as 500 against b's 1,000 and each of its
    # 10-token rows as 5, so it takes 100 rows to catch up: the whole slice goes to it.
    assert weighted == {"a1": 30}
    # Over a longer run the shares settle at 2:1 in tokens.
    usage = {"a": Usage(0, 0), "b": Usage(0, 0)}
    for _ in range(60):
        got = rows_of(plan(6, candidates, {"a": 2.0}, Recent(usage=usage, seconds=60), AT))
        for tenant in ("a", "b"):
            usage[tenant].rows += got.get(f"{tenant}1", 0)
            usage[tenant].tokens += 10 * got.get(f"{tenant}1", 0)
    assert usage["a"].tokens == 2 * usage["b"].tokens


def test_shares_are_counted_in_tokens_not_rows() -> None:
    # a's rows use 4x the tokens of b's: at equal weight, b gets 4 rows for each of a's.
    candidates = [Candidate("a1", "a", AT + DAY, 500), Candidate("b1", "b", AT + DAY, 500)]
    recent = Recent(
        usage={"a": Usage(tokens=4000, rows=100), "b": Usage(tokens=1000, rows=100)}, seconds=60
    )
    got = rows_of(plan(50, candidates, {}, recent, AT))
    # a starts 3,000 tokens ahead: b (10 tokens a row) gets the next 300 rows, so all 50.
    assert got == {"b1": 50}
    recent = Recent(
        usage={"a": Usage(tokens=4000, rows=100), "b": Usage(tokens=4000, rows=400)}, seconds=60
    )
    assert rows_of(plan(50, candidates, {}, recent, AT)) == {"a1": 10, "b1": 40}


def test_rows_already_running_count_toward_a_tenant_s_load() -> None:
    candidates = [Candidate("a1", "a", AT + DAY, 100), Candidate("b1", "b", AT + DAY, 100)]
    recent = Recent(running={"a": 10}, seconds=60)
    assert rows_of(plan(10, candidates, {}, recent, AT)) == {"b1": 10}
    assert rows_of(plan(20, candidates, {}, recent, AT)) == {"a1": 5, "b1": 15}


def test_a_deadline_at_risk_goes_first_whatever_the_shares() -> None:
    # 10 rows a second lately. b's batch needs 30 s and has 20 left: served first, in full,
    # though b used far more than a lately; a's batch (a day left) then shares the rest.
    candidates = [Candidate("a1", "a", AT + DAY, 100), Candidate("b1", "b", AT + 20, 300)]
    recent = Recent(usage={"b": Usage(tokens=60_000, rows=600)}, seconds=60)
    assert at_risk(candidates, recent, AT) == {"b1"}
    assert plan(64, candidates, {}, recent, AT) == [("b1", 64)]
    assert plan(400, candidates, {}, recent, AT) == [("b1", 300), ("a1", 100)]


def test_earlier_deadlines_count_toward_a_later_one_s_risk() -> None:
    # Each fits alone (50 rows at 10/s = 5 s), but the second has only 8 s and 100 rows are
    # ahead of it in deadline order.
    candidates = [Candidate("x", "a", AT + 6, 50), Candidate("y", "b", AT + 8, 50)]
    recent = Recent(usage={"a": Usage(tokens=100, rows=600)}, seconds=60)
    assert at_risk(candidates, recent, AT) == {"y"}


def test_nothing_is_at_risk_before_a_rate_is_known() -> None:
    candidates = [Candidate("x", "a", AT + 1, 10_000)]
    assert at_risk(candidates, Recent(), AT) == set()


def test_a_slice_larger_than_the_queue_takes_everything_once() -> None:
    candidates = [Candidate("a1", "a", AT + DAY, 3), Candidate("b1", "b", AT + DAY, 2)]
    assert rows_of(plan(100, candidates, {}, Recent(), AT)) == {"a1": 3, "b1": 2}
