"""Adaptive concurrency toward an upstream, over real HTTP: a batch to an upstream that answers
some requests 429 (the fault proxy in front of llama-cpp-python's server) completes every row,
and batchd's limit on batch attempts comes down from max_concurrency, as its gauge shows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.faultproxy import FaultProxy, Faults
from tests.support.helpers import API_KEY, chat_line, upload, wait_for
from tests.support.serverproc import ServerProcess, running_server
from tests.support.upstreamproc import UPSTREAM_MODEL, llama_server

MAX_CONCURRENCY = 8


@pytest.fixture(scope="module")
def overloaded(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, FaultProxy]]:
    tmp = tmp_path_factory.mktemp("adaptive")
    with llama_server(tmp / "upstream") as upstream:
        proxy = FaultProxy(upstream, faults=Faults(rate_limit=0.3, retry_after=0)).start()
        config = Path(tmp) / "batchd.toml"
        config.write_text(
            f"""
[models.smol]
engine = "openai-http"
base_url = "{proxy.url}/v1"
upstream_model = "{UPSTREAM_MODEL}"
max_concurrency = {MAX_CONCURRENCY}
adaptive_concurrency = true
latency_target_seconds = 30
"""
        )
        try:
            with running_server(
                tmp / "data", BATCHD_API_KEYS=API_KEY, BATCHD_CONFIG=str(config)
            ) as srv:
                yield srv, proxy
        finally:
            proxy.stop()


def test_429s_bring_the_batch_concurrency_down_and_every_row_still_completes(
    overloaded: tuple[ServerProcess, FaultProxy],
) -> None:
    server, proxy = overloaded
    api = openai.OpenAI(base_url=server.openai_base_url, api_key=API_KEY, max_retries=0)
    lines = [chat_line(f"r{i}", f"Say {i}.", max_tokens=2, model="smol") for i in range(24)]
    batch = api.batches.create(
        input_file_id=upload(api, lines), endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_for(api, batch.id, timeout=300)
    assert done.status == "completed" and done.request_counts is not None
    assert done.request_counts.completed == 24
    assert proxy.count(outcome="429") > 0
    page = httpx.get(
        f"{server.url}/metrics", headers={"authorization": f"Bearer {API_KEY}"}, timeout=30
    ).text
    [gauge] = [
        line for line in page.splitlines()
        if line.startswith('batchd_upstream_concurrency_limit{model="smol"}')
    ]  # fmt: skip
    assert float(gauge.rsplit(" ", 1)[1]) < MAX_CONCURRENCY
    decreases = [
        line for line in page.splitlines()
        if line.startswith('batchd_upstream_concurrency_decreases_total{model="smol"}')
    ]  # fmt: skip
    assert decreases and float(decreases[0].rsplit(" ", 1)[1]) >= 1
