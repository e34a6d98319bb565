"""What batches cost (one model, several models), per-day totals, the console's views and
the estimate's arithmetic, over a temporary SQLite store and the fake engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchd.engines.fake import FAKE_MODEL
from batchd.errors import InvalidRequest, NotFound
from batchd.service import console, costs, estimates
from batchd.service.services import Services
from batchd.store.records import (
    BatchRecord,
    BatchStatus,
    RequestCounts,
    RequestLine,
    RequestOutcome,
    RequestState,
    Usage,
)
from tests.unit.service.conftest import MakeServices
from tests.unit.store.builders import add_batch, batch_values, finish_all

# finish_all's outcome: 3 prompt tokens, 4 completion tokens, none cached.
PER_MILLION = 1_000_000


def test_a_one_model_batch_is_priced_from_its_usage(services: Services) -> None:
    add_batch(services.store, "b1", 2, model="m")
    finish_all(services.store)
    record = services.store.get_batch("b1")
    assert record is not None
    record.model = "m"
    cost = costs.batch_cost(services, record).to_wire()
    assert cost["realtime"] == pytest.approx(round((6 * 0.10 + 8 * 0.40) / PER_MILLION, 6))
    assert cost["batch"] == pytest.approx(round((6 * 0.05 + 8 * 0.20) / PER_MILLION, 6))
    assert cost["saving_percent"] == 50.0


def test_a_batch_of_several_models_is_priced_per_model(
    make_services: MakeServices, tmp_path: Path
) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text("[models.big]\ninput = 100.0\noutput = 100.0\nbatch_discount = 0.5\n")
    services = make_services(prices_file=prices)
    store = services.store
    store.create_batch(batch_values("b2", model="big,small"))
    store.insert_requests(
        "b2",
        [RequestLine(1, "a", b"{}", "big", "k"), RequestLine(2, "b", b"{}", "small", "k")],
    )
    assert store.transition("b2", [BatchStatus.VALIDATING], BatchStatus.IN_PROGRESS)
    finish_all(store)
    record = store.get_batch("b2")
    assert record is not None
    cost = costs.batch_cost(services, record)
    assert cost.realtime == pytest.approx((7 * 100.0 + 3 * 0.10 + 4 * 0.40) / PER_MILLION)
    assert cost.batch == pytest.approx((7 * 50.0 + 3 * 0.05 + 4 * 0.20) / PER_MILLION)


def test_daily_totals_are_the_tenants_own(services: Services) -> None:
    add_batch(services.store, "b1", 2, tenant="a")
    add_batch(services.store, "b2", 3, tenant="b")
    finish_all(services.store)
    [day] = costs.daily_totals(services, "a", days=7)
    assert (day["batches"], day["requests"]) == (1, 2)
    assert (day["input_tokens"], day["output_tokens"]) == (6, 8)
    assert day["cost"]["saving"] > 0
    [everyone] = costs.daily_totals(services, None, days=7)
    assert (everyone["batches"], everyone["requests"]) == (2, 5)


def test_console_lists_both_surfaces_newest_first_by_tenant_and_status(
    services: Services,
) -> None:
    store = services.store
    add_batch(store, "old", 1, tenant="a")
    add_batch(store, "msg", 1, tenant="a", surface="anthropic")
    add_batch(store, "theirs", 1, tenant="b")
    page = console.list_batches(services, "a", None, limit=10, older_than=None)
    assert [b["id"] for b in page["data"]] == ["msg", "old"]
    assert [b["surface"] for b in page["data"]] == ["anthropic", "openai"]
    everyone = console.list_batches(services, None, None, limit=2, older_than=None)
    assert [b["id"] for b in everyone["data"]] == ["theirs", "msg"]
    assert everyone["has_more"]
    rest = console.list_batches(services, None, None, limit=2, older_than="msg")
    assert [b["id"] for b in rest["data"]] == ["old"]
    assert console.list_batches(services, "a", ["completed"], 10, None)["data"] == []


def test_an_unknown_status_filter_is_a_400_naming_it() -> None:
    with pytest.raises(InvalidRequest, match="'done'"):
        console.parse_statuses("completed,done")
    assert console.parse_statuses("") is None


def test_a_batch_page_shows_its_first_failures_with_their_lines(services: Services) -> None:
    store = services.store
    add_batch(store, "b1", 3, tenant="a")
    error = json.dumps({"error": {"message": "context too long"}}).encode()
    leased = store.lease("w", 10, lease_seconds=30)
    for item in leased:
        ok = item.line_no != 2
        outcome = RequestOutcome(
            RequestState.SUCCEEDED if ok else RequestState.ERRORED,
            200 if ok else 400,
            b"{}" if ok else error,
        )
        assert store.complete(item, "w", outcome)
    page = console.batch_page(services, "a", "b1")
    assert page["failures"] == [
        {
            "line": 2,
            "custom_id": "c1",
            "state": "errored",
            "status_code": 400,
            "message": "context too long",
        }
    ]
    assert [t["status"] for t in page["timeline"]] == ["created", "in_progress"]
    with pytest.raises(NotFound):
        console.batch_page(services, "someone-else", "b1")


def _record(**fields: object) -> BatchRecord:
    base: dict[str, object] = {
        "id": "b",
        "tenant": "t",
        "surface": "openai",
        "endpoint": "/v1/chat/completions",
        "input_file_id": None,
        "completion_window": "24h",
        "status": BatchStatus.IN_PROGRESS,
        "model": "m",
        "errors": None,
        "metadata": None,
        "output_file_id": None,
        "error_file_id": None,
        "created_at": 0,
        "in_progress_at": 100,
        "expires_at": 1000,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
    }
    base.update(fields)
    return BatchRecord(**base)  # type: ignore[arg-type]


def test_progress_projects_the_pace_so_far_and_counts_the_window_left() -> None:
    record = _record(counts=RequestCounts(pending=30, succeeded=10), usage=Usage(0, 0, 500))
    progress = console.progress(record, now=150)
    assert progress["fraction"] == 0.25
    assert progress["output_tokens_per_second"] == 10.0
    assert progress["eta_seconds"] == 150.0  # 10 done in 50 s: 30 more take 150 s
    assert progress["window_left_seconds"] == 850
    ended = _record(status=BatchStatus.COMPLETED, completed_at=200, counts=RequestCounts())
    assert console.progress(ended, now=999)["window_left_seconds"] is None


def test_throughput_is_measured_over_the_merged_time_batches_ran() -> None:
    a = _record(
        id="a",
        in_progress_at=0,
        completed_at=100,
        status=BatchStatus.COMPLETED,
        counts=RequestCounts(succeeded=10),
        usage=Usage(input_tokens=1000, cached_tokens=500, output_tokens=500),
    )
    b = _record(
        id="b",
        in_progress_at=50,
        completed_at=150,
        status=BatchStatus.COMPLETED,
        counts=RequestCounts(succeeded=10),
        usage=Usage(input_tokens=1000, cached_tokens=0, output_tokens=1000),
    )
    measured = estimates.measure([a, b], now=1000)
    assert measured.busy_seconds == 150  # 0-150, not 100 + 100
    assert measured.tokens_per_second == pytest.approx(3000 / 150)
    assert measured.tokens_per_request == pytest.approx(150)
    assert measured.output_per_request == {"m": 75.0}


def test_an_estimate_counts_prompts_bounds_outputs_and_names_failing_lines(
    services: Services,
) -> None:
    def line(i: int, model: str, max_tokens: int) -> str:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "one two three"}],
            "max_tokens": max_tokens,
        }
        return json.dumps(
            {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        )

    data = "\n".join(
        [line(0, FAKE_MODEL, 10), line(1, "default", 20), line(2, "nobody-serves-this", 5)]
    ).encode()
    answer = estimates.estimate(services, data, "/v1/chat/completions")
    assert answer["requests"] == 3
    assert answer["requests_failing"] == 1
    assert answer["failing_lines"][0]["line"] == 3
    assert answer["input_tokens"] == 6  # the fake engine counts words
    assert answer["output_tokens"] == {"expected": 30, "max": 30}  # nothing measured yet
    assert answer["time"]["seconds"] is None  # no throughput measured: said, not guessed
    assert any("no measured throughput" in a for a in answer["assumptions"])
    assert answer["cost"]["batch"] < answer["cost"]["realtime"]


def test_an_estimate_of_a_bad_file_names_the_line(services: Services) -> None:
    with pytest.raises(InvalidRequest) as raised:
        estimates.estimate(services, b'{"custom_id": "a"}\n', "/v1/chat/completions")
    assert raised.value.line == 1


def test_prompts_sharing_a_prefix_count_it_once() -> None:
    lines = estimates._ModelLines(prompts=[(1, 2, 3), (5,), (1, 2, 4), (1, 2, 3)])
    # In order: (1,2,3) (1,2,3) (1,2,4) (5,): shared 0 + 3 + 2 + 0.
    assert lines.shared_tokens == 5


def test_requests_ahead_count_until_the_batch_is_done_at_one_shared_pace() -> None:
    # 10 requests ahead of 100 tokens each; the batch's own are 30 tokens each: each one
    # ahead computes 30 tokens while the batch runs; if they are shorter, all of theirs.
    assert estimates.shared_ahead(10, 100.0, 30.0) == 300
    assert estimates.shared_ahead(10, 20.0, 30.0) == 200
    assert estimates.shared_ahead(0, 20.0, 30.0) == 0
