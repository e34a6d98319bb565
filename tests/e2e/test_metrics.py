"""Prometheus metrics of `batchd serve`, scraped over real HTTP after a real batch ran on the
bundled model: queue depth per state, leases, engine tokens, request latency, finalized
batches, and HTTP latency labelled by route template (never by id)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import API_KEY, chat_line, upload, wait_for
from tests.serverproc import ServerProcess, running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of this module's own: the session's shared server may still be finishing other
    tests' work, which would make the exact counters below count someone else's requests."""
    data_dir = tmp_path_factory.mktemp("batchd-metrics")
    with running_server(data_dir, BATCHD_API_KEYS=API_KEY) as srv:
        yield srv


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"{url}/metrics", timeout=30)  # no key: aggregates only, open
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


def test_metrics_endpoint_needs_no_key_but_other_paths_do(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/metrics", timeout=30).status_code == 200
    assert httpx.post(f"{server.url}/metrics", timeout=30).status_code == 401
    assert (
        httpx.get(
            f"{server.openai_base_url}/models",
            headers={"authorization": f"Bearer {API_KEY}"},
            timeout=30,
        ).status_code
        == 200
    )
