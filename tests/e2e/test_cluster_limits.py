"""Upstream limits hold for the whole deployment: two and three `batchd worker` processes on one
PostgreSQL database send batches to one upstream (llama-cpp-python's server through the fault
proxy), and the proxy never sees more requests at once than the upstream's `max_concurrency`,
nor more a second than its `requests_per_minute` allows, however many workers share them."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.faultproxy import FaultProxy, Faults
from tests.support.helpers import chat_line, upload, wait_for
from tests.support.procs import Proc, shared_database_env, wait_healthy
from tests.support.serverproc import free_port
from tests.support.upstreamproc import UPSTREAM_MODEL, llama_server

KEY = "cluster-key-01"
SLOTS = 2
RPM = 120  # two a second
ROWS = 16


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with llama_server(tmp_path_factory.mktemp("cluster-upstream")) as url:
        yield url


@pytest.fixture()
def proxies(upstream: str) -> Iterator[tuple[FaultProxy, FaultProxy]]:
    # A slow upstream for the concurrency limit (each request takes a second at least, so
    # workers overlap), a plain one for the rate limit.
    slow = FaultProxy(upstream, faults=Faults(delay_seconds=1.0)).start()
    plain = FaultProxy(upstream).start()
    try:
        yield slow, plain
    finally:
        slow.stop()
        plain.stop()


def registry(slow: FaultProxy, plain: FaultProxy) -> str:
    return f"""
[models.smol-slots]
engine = "openai-http"
base_url = "{slow.url}/v1"
upstream_model = "{UPSTREAM_MODEL}"
max_concurrency = {SLOTS}

[models.smol-rate]
engine = "openai-http"
base_url = "{plain.url}/v1"
upstream_model = "{UPSTREAM_MODEL}"
max_concurrency = 4
requests_per_minute = {RPM}
"""


def most_in_any_window(arrivals: list[float], seconds: float) -> int:
    arrivals = sorted(arrivals)
    return max(
        bisect.bisect_left(arrivals, start + seconds) - i for i, start in enumerate(arrivals)
    )


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_share_one_upstream_s_concurrency_and_rate(
    workers: int,
    postgres_url: str,
    proxies: tuple[FaultProxy, FaultProxy],
    tmp_path: Path,
) -> None:
    slow, plain = proxies
    config = tmp_path / "batchd.toml"
    config.write_text(registry(slow, plain))
    env = shared_database_env(postgres_url, tmp_path / "shared", KEY, BATCHD_CONFIG=str(config))
    port = free_port()
    procs = [Proc(["api", "--port", str(port)], env, tmp_path / "api.log").start()]
    try:
        wait_healthy(procs[0], port)
        for index in range(workers):
            worker = Proc(["worker"], env, tmp_path / f"worker{index}.log").start()
            procs.append(worker)
            worker.wait_for_log("running")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        batches = [
            client.batches.create(
                input_file_id=upload(
                    client,
                    [
                        chat_line(f"{model}-{i}", f"Say {i}.", max_tokens=2, model=model)
                        for i in range(ROWS)
                    ],
                ),
                endpoint="/v1/chat/completions",
                completion_window="24h",
            ).id
            for model in ("smol-slots", "smol-rate")
        ]
        for batch_id in batches:
            done = wait_for(client, batch_id, timeout=300)
            assert done.status == "completed", done
            assert done.request_counts is not None and done.request_counts.completed == ROWS
        assert slow.count() == ROWS and plain.count() == ROWS
        assert slow.max_inflight <= SLOTS, slow.max_inflight
        # Two a second, with a bucket of two: at most 2 x 3 + 2 in any 3 seconds.
        arrivals = [seen.arrived for seen in plain.seen]
        assert most_in_any_window(arrivals, 3.0) <= 2 * 3 + 2, sorted(arrivals)
    finally:
        for proc in reversed(procs):
            proc.stop()
