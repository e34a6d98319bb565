"""Prometheus metrics of `batchd serve`, scraped over real HTTP after a real batch ran on the
bundled model: queue depth per state, leases, engine tokens, request latency, finalized
batches, and HTTP latency labelled by route template (never by id). The scrape needs an API
key (any tenant's) when keys are configured, and is open on a loopback server without keys."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.helpers import (
    API_KEY,
    OTHER_KEY,
    chat_line,
    create_message_batch,
    keyed_server,
    upload,
    wait_for,
)
from tests.support.serverproc import ServerProcess, running_server

BEARER = {"authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of this module's own: the session's shared server may still be finishing other
    tests' work, which would make the exact counters below count someone else's requests."""
    with keyed_server(tmp_path_factory, "batchd-metrics") as srv:
        yield srv


def scrape(
    url: str, headers: dict[str, str] | None = None
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(
        f"{url}/metrics", headers=BEARER if headers is None else headers, timeout=30
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        v
        for (n, lbls), v in samples.items()
        if n == name and all((k, want) in lbls for k, want in labels.items())
    )


def test_metrics_count_a_batch_end_to_end(server: ServerProcess, client: openai.OpenAI) -> None:
    before = scrape(server.url)
    lines = [chat_line(f"m{i}", f"Say {i}.", max_tokens=3) for i in range(5)]
    batch = client.batches.create(
        input_file_id=upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = wait_for(client, batch.id)
    assert done.status == "completed"
    client.batches.retrieve(batch.id)
    after = scrape(server.url)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # The queue's depth, by state; read from the database at most every 5 s, so the page may
    # lag by that much.
    deadline = time.monotonic() + 30
    while value(after, "batchd_queue_requests", state="succeeded") < 5:
        assert time.monotonic() < deadline
        time.sleep(0.5)
        after = scrape(server.url)
    assert ("batchd_queue_requests", (("state", "pending"),)) in after
    assert value(after, "batchd_batches", status="completed") >= 1
    # What this process did for the batch.
    assert grew("batchd_leases_claimed_requests_total") >= 5
    assert grew("batchd_lease_slices_total") >= 1
    assert grew("batchd_batch_requests_finished_total", state="succeeded") == 5
    assert grew("batchd_batch_request_duration_seconds_count") == 5
    assert grew("batchd_batches_finalized_total", status="completed") == 1
    assert grew("batchd_engine_completion_tokens_total") >= 5
    assert grew("batchd_engine_prompt_tokens_total") > 0
    assert value(after, "batchd_leases_held_requests") == 0
    # HTTP latency by route template, never by id; refusals are counted too.
    assert (
        grew(
            "batchd_http_request_duration_seconds_count",
            route="/v1/batches/{batch_id}",
            method="GET",
            status="200",
        )
        >= 2
    )
    assert not any(batch.id in str(labels) for _, labels in after)
    refused = httpx.get(f"{server.openai_base_url}/batches", timeout=30)
    assert refused.status_code == 401
    assert (
        value(scrape(server.url), "batchd_http_request_duration_seconds_count", status="401") >= 1
    )


def test_polls_and_lists_are_labelled_by_route_template(server: ServerProcess) -> None:
    """The polling routes are served on a fast path of their own (api/poll_fast_path.py); their
    latency still lands under the route's template, for both surfaces."""
    before = scrape(server.url)
    message_batch_id = create_message_batch(server.url, "a0")
    for path in (
        "/v1/batches",
        "/v1/batches?limit=3",
        "/v1/messages/batches",
        f"/v1/messages/batches/{message_batch_id}",
    ):
        response = httpx.get(f"{server.url}{path}", headers=BEARER, timeout=30)
        assert response.status_code == 200, response.text
    after = scrape(server.url)

    def grew(route: str) -> float:
        name = "batchd_http_request_duration_seconds_count"
        labels = {"route": route, "method": "GET", "status": "200"}
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("/v1/batches") == 2
    assert grew("/v1/messages/batches") == 1
    assert grew("/v1/messages/batches/{message_batch_id}") == 1
    assert not any(message_batch_id in str(labels) for _, labels in after)


def test_metrics_endpoint_needs_a_key(server: ServerProcess) -> None:
    url = f"{server.url}/metrics"
    missing = httpx.get(url, timeout=30)
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "invalid_request_error"  # OpenAI's shape
    assert "batchd_" not in missing.text
    wrong = httpx.get(url, headers={"authorization": "Bearer not-a-key-at-all"}, timeout=30)
    assert wrong.status_code == 401
    assert "batchd_" not in wrong.text
    assert httpx.head(url, timeout=30).status_code == 401
    # Any tenant's key, either header (Prometheus sends `authorization: Bearer <credentials>`).
    assert "batchd_queue_requests" in httpx.get(url, headers=BEARER, timeout=30).text
    other = httpx.get(url, headers={"authorization": f"Bearer {OTHER_KEY}"}, timeout=30)
    assert other.status_code == 200
    assert httpx.get(url, headers={"x-api-key": OTHER_KEY}, timeout=30).status_code == 200
    assert httpx.post(url, headers=BEARER, timeout=30).status_code == 405
    # /healthz alone stays open.
    assert httpx.get(f"{server.url}/healthz", timeout=30).status_code == 200


def test_metrics_are_open_on_a_loopback_server_without_keys(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    data_dir = tmp_path_factory.mktemp("batchd-metrics-nokeys")
    with running_server(data_dir, BATCHD_ENGINE="fake") as srv:
        samples = scrape(srv.url, headers={})
        assert ("batchd_queue_requests", (("state", "pending"),)) in samples
        # As open as every other route there, no more.
        assert httpx.get(f"{srv.url}/v1/batches", timeout=30).status_code == 200


def test_the_loop_is_paced_while_the_engine_decodes_batch_work(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    """loop_pacing.py: while the embedded engine decodes a batch, the event loop moderates its
    wake-ups, and says how long it slept; polls are still answered meanwhile."""
    name = "batchd_loop_paced_seconds_total"
    before = value(scrape(server.url), name)
    lines = [chat_line(f"p{i}", f"Count to {i + 5}.", max_tokens=24) for i in range(8)]
    batch = client.batches.create(
        input_file_id=upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = wait_for(client, batch.id)  # polls every few tenths of a second: all answered
    assert done.status == "completed", done
    assert value(scrape(server.url), name) > before
