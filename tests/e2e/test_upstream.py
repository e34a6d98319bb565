"""Upstream engines end to end: a real ``batchd serve --config`` in front of a real
OpenAI-compatible server (llama-cpp-python's own, on the bundled model), with a fault-injecting
proxy between them and a canary that must never be reached. Driven by the official SDKs."""

from __future__ import annotations

import itertools
import json
import math
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.support.faultproxy import (
    FAIL_400_BODY,
    FAIL_400_MARKER,
    Canary,
    FaultProxy,
    Faults,
    Seen,
    fail_body,
    fail_marker,
)
from tests.support.helpers import API_KEY, chat_line, read_jsonl, upload, wait_for
from tests.support.serverproc import ServerProcess, free_port
from tests.support.upstreamproc import UPSTREAM_MODEL, llama_server

UPSTREAM_KEY = "sk-upstream-test-key"
FAULTY_CONCURRENCY = 2
LIMITED_RPM = 60  # one request a second
TPM = 2400  # smol-tpm: 40 tokens a second
SELF_TPM = 130  # self-tpm: 2.17 tokens a second


def closed_port() -> int:
    """A port nobody listens on: connecting is refused at once (an upstream that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with llama_server(tmp_path_factory.mktemp("llama-server"), embedding=True) as url:
        yield url


def proxy_fixture(name: str) -> Any:
    """A module-scoped fault proxy in front of the shared upstream: one per test that counts
    what its upstream sees, so no test reads another's traffic."""

    @pytest.fixture(scope="module", name=name)
    def running_proxy(upstream: str) -> Iterator[FaultProxy]:
        p = FaultProxy(upstream).start()
        try:
            yield p
        finally:
            p.stop()

    return running_proxy


proxy = proxy_fixture("proxy")
limited_proxy = proxy_fixture("limited_proxy")
tpm_proxy = proxy_fixture("tpm_proxy")
one_proxy = proxy_fixture("one_proxy")


@pytest.fixture(scope="module")
def pool(upstream: str) -> Iterator[tuple[FaultProxy, FaultProxy]]:
    first, second = FaultProxy(upstream).start(), FaultProxy(upstream).start()
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture(scope="module")
def gateway_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def self_proxy(gateway_port: int) -> Iterator[FaultProxy]:
    """In front of the gateway's own embedded model: an upstream that, unlike llama-cpp-python's
    server, reports ``usage`` in streams (``stream_options.include_usage``)."""
    p = FaultProxy(f"http://127.0.0.1:{gateway_port}").start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def native_proxy(gateway_port: int) -> Iterator[FaultProxy]:
    """In front of the gateway's own embedded model too: an upstream that serves
    /v1/responses itself, as vLLM does."""
    p = FaultProxy(f"http://127.0.0.1:{gateway_port}").start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def canary() -> Iterator[Canary]:
    c = Canary()
    yield c
    c.close()


def registry_toml(
    proxy: FaultProxy,
    limited: FaultProxy,
    down_port: int,
    pool: tuple[FaultProxy, FaultProxy] | None = None,
    extra: str = "",
) -> str:
    pooled = ""
    if pool is not None:
        pooled = f"""
[models.smol-pool]
engine = "openai-http"
base_urls = ["{pool[0].url}/v1", "{pool[1].url}/v1"]
upstream_model = "{UPSTREAM_MODEL}"
max_concurrency = 1
"""
    return (
        pooled
        + extra
        + f"""
[llamacpp]
max_seqs = 4
ctx_size = 2048

[models.local]
engine = "llamacpp"

[models.smol]
engine = "openai-http"
base_url = "{proxy.url}/v1"
upstream_model = "{UPSTREAM_MODEL}"
api_key_env = "UPSTREAM_TEST_KEY"
max_concurrency = {FAULTY_CONCURRENCY}
timeout_seconds = 8
context_length = 2048

[models.smol-limited]
engine = "openai-http"
base_url = "{limited.url}/v1"
upstream_model = "{UPSTREAM_MODEL}"
max_concurrency = 1
requests_per_minute = {LIMITED_RPM}

[models.down]
engine = "openai-http"
base_urls = ["http://127.0.0.1:{down_port}/v1"]
max_concurrency = 2
"""
    )


def more_models(
    tpm: FaultProxy, one: FaultProxy, self_upstream: FaultProxy, native: FaultProxy
) -> str:
    return f"""
[models.self-native]
engine = "openai-http"
base_url = "{native.url}/v1"
upstream_model = "local"
api_key_env = "SELF_TEST_KEY"
responses = "native"

[models.smol-tpm]
engine = "openai-http"
base_url = "{tpm.url}/v1"
upstream_model = "{UPSTREAM_MODEL}"
max_concurrency = 1
tokens_per_minute = {TPM}

[models.smol-one]
engine = "openai-http"
base_url = "{one.url}/v1"
upstream_model = "{UPSTREAM_MODEL}"
max_concurrency = 1
timeout_seconds = 300  # a stalled stream is ended by its client leaving, not by a timeout

[models.self-tpm]
engine = "openai-http"
base_url = "{self_upstream.url}/v1"
upstream_model = "local"
api_key_env = "SELF_TEST_KEY"
max_concurrency = 1
tokens_per_minute = {SELF_TPM}
"""


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    proxy: FaultProxy,
    limited_proxy: FaultProxy,
    pool: tuple[FaultProxy, FaultProxy],
    tpm_proxy: FaultProxy,
    one_proxy: FaultProxy,
    self_proxy: FaultProxy,
    native_proxy: FaultProxy,
    gateway_port: int,
) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("gateway")
    config = root / "batchd.toml"
    extra = more_models(tpm_proxy, one_proxy, self_proxy, native_proxy)
    config.write_text(registry_toml(proxy, limited_proxy, closed_port(), pool, extra))
    server = ServerProcess(
        data_dir=root / "data",
        port=gateway_port,
        env={
            "BATCHD_API_KEYS": API_KEY,
            "BATCHD_CONFIG": str(config),
            "UPSTREAM_TEST_KEY": UPSTREAM_KEY,
            "SELF_TEST_KEY": API_KEY,
        },
    ).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def oa(gateway: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.openai_base_url, api_key=API_KEY, max_retries=0)


@pytest.fixture()
def an(gateway: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=API_KEY, max_retries=0)


def attempts_by_custom_id(server: ServerProcess, batch_id: str) -> dict[str, int]:
    with sqlite3.connect(server.data_dir / "batchd.sqlite3") as db:
        rows = db.execute(
            "SELECT custom_id, upstream_attempts FROM requests WHERE batch_id = ?", (batch_id,)
        ).fetchall()
    return dict(rows)


def run_batch(
    client: openai.OpenAI,
    lines: list[dict[str, Any]],
    endpoint: str = "/v1/chat/completions",
    window: str = "24h",
    timeout: float = 240,
) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
    batch = client.batches.create(
        input_file_id=upload(client, lines), endpoint=endpoint, completion_window=window
    )
    batch = wait_for(client, batch.id, timeout=timeout)
    return batch, read_jsonl(client, batch.output_file_id), read_jsonl(client, batch.error_file_id)


def smol_line(custom_id: str, content: str, **body: Any) -> dict[str, Any]:
    return chat_line(custom_id, content, model="smol", max_tokens=4, **body)


# ---------------------------------------------------------------------------------- tests


def test_models_lists_each_model_with_its_engine(oa: openai.OpenAI) -> None:
    engines = {m.id: m.model_extra["engine"] for m in oa.models.list().data}
    assert engines == {
        "local": "llamacpp",
        "all-minilm-l6-v2": "llamacpp",  # the bundled embedding model comes with the bundled one
        "smol": "openai-http",
        "smol-limited": "openai-http",
        "smol-pool": "openai-http",
        "smol-tpm": "openai-http",
        "smol-one": "openai-http",
        "self-tpm": "openai-http",
        "self-native": "openai-http",
        "down": "openai-http",
    }


def test_openai_batch_passes_bodies_through_and_keeps_upstream_errors(
    oa: openai.OpenAI, gateway: ServerProcess, proxy: FaultProxy
) -> None:
    proxy.reset_stats()
    lines = [
        smol_line("plain", "Say hi."),
        # The embedded engine refuses penalties; the upstream takes them, so must we.
        smol_line("penalties", "Count to three.", presence_penalty=0.5, frequency_penalty=0.1),
        smol_line("refused", f"{FAIL_400_MARKER} now"),
        chat_line("embedded", "Say hi.", model="local", max_tokens=4),
        smol_line("bad-range", "x", temperature=7),  # basic range checks still apply
    ]
    batch, output, errors = run_batch(oa, lines)
    assert batch.status == "completed"
    assert sorted(line["custom_id"] for line in errors) == ["bad-range", "refused"]
    by_id = {line["custom_id"]: line for line in output + errors}
    assert sorted(by_id) == ["bad-range", "embedded", "penalties", "plain", "refused"]
    for custom_id in ("plain", "penalties", "embedded"):
        response = by_id[custom_id]["response"]
        assert response["status_code"] == 200, response
        assert response["body"]["choices"][0]["message"]["content"]
    # The upstream's own body came back (its model name, its id), usage included.
    assert by_id["plain"]["response"]["body"]["model"] != "smol"
    assert by_id["plain"]["response"]["body"]["usage"]["prompt_tokens"] > 0
    refused = by_id["refused"]["response"]
    assert refused["status_code"] == 400
    assert refused["body"] == json.loads(FAIL_400_BODY)
    assert by_id["bad-range"]["response"]["status_code"] == 400
    assert by_id["bad-range"]["response"]["body"]["error"]["param"] == "temperature"
    assert batch.request_counts.completed == 3 and batch.request_counts.failed == 2
    assert batch.usage.input_tokens > 0 and batch.usage.output_tokens > 0
    # Only the model name was rewritten; the configured key went along; nothing else was sent.
    sent = [json.loads(s.body) for s in proxy.seen]
    # plain, penalties, refused; bad-range never left. (On a slow machine an attempt may pass the
    # 8 s timeout and be retried: count distinct bodies, and check the attempts add up.)
    assert len({json.dumps(b, sort_keys=True) for b in sent}) == 3
    assert {body["model"] for body in sent} == {UPSTREAM_MODEL}
    penalties = next(b for b in sent if b.get("presence_penalty") == 0.5)
    assert penalties["frequency_penalty"] == 0.1
    assert {s.authorization for s in proxy.seen} == {f"Bearer {UPSTREAM_KEY}"}
    attempts = attempts_by_custom_id(gateway, batch.id)
    assert sum(attempts.values()) == len(sent)
    assert attempts["refused"] == 1  # a 4xx from upstream is final: never retried
    assert attempts["plain"] >= 1 and attempts["penalties"] >= 1
    assert attempts["embedded"] == 0 and attempts["bad-range"] == 0


def test_embeddings_batch_for_upstream_models_only(oa: openai.OpenAI) -> None:
    lines = [
        {
            "custom_id": "up",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "smol", "input": "hello there"},
        },
        {
            "custom_id": "embedded",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "local", "input": "hello there"},
        },
    ]
    batch, output, errors = run_batch(oa, lines, endpoint="/v1/embeddings")
    assert batch.status == "completed"
    by_id = {line["custom_id"]: line["response"] for line in output + errors}
    assert by_id["up"]["status_code"] == 200
    assert by_id["up"]["body"]["data"][0]["embedding"]
    assert by_id["embedded"]["status_code"] == 400
    assert "embeddings" in by_id["embedded"]["body"]["error"]["message"]


def test_faults_every_request_ends_exactly_once_within_limits(
    oa: openai.OpenAI, gateway: ServerProcess, proxy: FaultProxy
) -> None:
    proxy.set_faults(
        Faults(
            rate_limit=0.2,
            server_error=0.15,
            reset=0.1,
            stall=0.08,
            retry_after=1,
            stall_seconds=12,  # beyond the 8 s timeout: batchd gives up and retries
            seed=7,
        )
    )
    proxy.reset_stats()
    good = [f"f{i}" for i in range(12)]
    refused = [f"no{i}" for i in range(3)]  # the upstream answers these 400: final
    lines = [smol_line(custom_id, f"Name a colour, {custom_id}.") for custom_id in good]
    for index, custom_id in enumerate(refused):
        lines.insert(4 * index + 2, smol_line(custom_id, f"{FAIL_400_MARKER} {custom_id}"))
    try:
        batch, output, errors = run_batch(oa, lines, timeout=300)
    finally:
        proxy.set_faults(Faults())
    assert batch.status == "completed", batch
    # Every request ended exactly once, in the file its outcome belongs in.
    ended = [line["custom_id"] for line in output + errors]
    assert sorted(ended) == sorted(good + refused)
    assert sorted(line["custom_id"] for line in output) == sorted(good)
    assert all(line["response"]["status_code"] == 200 for line in output)
    for line in errors:
        assert line["response"]["status_code"] == 400
        assert line["response"]["body"] == json.loads(FAIL_400_BODY)
    assert batch.request_counts.completed == 12 and batch.request_counts.failed == 3
    outcomes = [s.outcome for s in proxy.seen]
    for fault in ("429", "500", "reset", "stall", "400"):
        assert fault in outcomes, outcomes  # every fault kind was met
    attempts = attempts_by_custom_id(gateway, batch.id)
    # Every attempt the upstream side saw is accounted to exactly one request.
    assert sum(attempts.values()) == len(proxy.seen)
    assert max(attempts[c] for c in good) > 1 and min(attempts[c] for c in good) >= 1
    assert all(attempts[c] == 1 for c in refused), attempts  # final at the first answer
    assert proxy.count(outcome="400") == 3
    # The limit held, and was used: two requests were in flight at once, not one at a time.
    assert proxy.max_inflight == FAULTY_CONCURRENCY


def test_requests_per_minute_and_concurrency_are_respected(
    oa: openai.OpenAI, limited_proxy: FaultProxy
) -> None:
    limited_proxy.reset_stats()
    lines = [chat_line(f"r{i}", f"Say {i}.", model="smol-limited", max_tokens=2) for i in range(6)]
    batch, output, _ = run_batch(oa, lines)
    assert batch.status == "completed" and len(output) == 6
    arrivals = sorted(s.arrived for s in limited_proxy.seen)
    assert len(arrivals) == 6
    # 60 per minute with one second's burst: at most 2 starts in any 1-second window, and the
    # six take at least 4 seconds however fast the upstream is.
    for index in range(len(arrivals) - 2):
        assert arrivals[index + 2] - arrivals[index] >= 0.95, arrivals
    assert arrivals[-1] - arrivals[0] >= 4.5
    assert limited_proxy.max_inflight == 1


def test_a_pool_spreads_requests_over_its_urls(
    oa: openai.OpenAI, pool: tuple[FaultProxy, FaultProxy]
) -> None:
    for proxy in pool:
        proxy.reset_stats()
    lines = [chat_line(f"p{i}", f"Say {i}.", model="smol-pool", max_tokens=2) for i in range(6)]
    batch, output, _ = run_batch(oa, lines)
    assert batch.status == "completed" and len(output) == 6
    counts = [len(proxy.seen) for proxy in pool]
    assert sum(counts) == 6 and min(counts) >= 2, counts
    assert max(proxy.max_inflight for proxy in pool) == 1  # each URL's own limit


def test_a_pool_prefers_the_url_with_less_outstanding_work(
    oa: openai.OpenAI, pool: tuple[FaultProxy, FaultProxy]
) -> None:
    fast, slow = pool
    for proxy in pool:
        proxy.reset_stats()
    slow.set_faults(Faults(delay_seconds=8))  # every request there takes 8 s more
    try:
        lines = [
            chat_line(f"s{i}", f"Say {i}.", model="smol-pool", max_tokens=2) for i in range(12)
        ]
        batch, output, _ = run_batch(oa, lines)
    finally:
        slow.set_faults(Faults())
    assert batch.status == "completed" and len(output) == 12
    counts = len(fast.seen), len(slow.seen)
    assert sum(counts) == 12, counts
    # Round-robin would split them 6/6; by outstanding work the fast URL takes each request
    # that arrives while the slow one is still busy.
    assert counts[0] >= 2 * counts[1], counts
    assert max(proxy.max_inflight for proxy in pool) == 1


def test_a_down_upstream_does_not_block_other_models(
    oa: openai.OpenAI, gateway: ServerProcess
) -> None:
    # More rows for the down model than the scheduler's whole capacity, and more urgent.
    down_lines = [chat_line(f"d{i}", "hi", model="down", max_tokens=2) for i in range(40)]
    down = oa.batches.create(
        input_file_id=upload(oa, down_lines),
        endpoint="/v1/chat/completions",
        completion_window="1m",
    )
    time.sleep(2)  # let its rows be leased and start failing
    started = time.monotonic()
    batch, output, _ = run_batch(oa, [smol_line(f"u{i}", f"Hi {i}.") for i in range(3)])
    assert batch.status == "completed" and len(output) == 3
    assert time.monotonic() - started < 45
    assert oa.batches.retrieve(down.id).status == "in_progress"

    ended = wait_for(oa, down.id, timeout=150)
    assert ended.status == "expired"
    assert ended.request_counts.failed == 40 and ended.request_counts.completed == 0
    errors = read_jsonl(oa, ended.error_file_id)
    assert sorted(e["custom_id"] for e in errors) == sorted(f"d{i}" for i in range(40))
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    attempts = attempts_by_custom_id(gateway, down.id)
    assert sum(attempts.values()) >= 2  # it was tried, and the tries were recorded


def test_routing_fields_are_refused_and_the_canary_sees_nothing(
    oa: openai.OpenAI, an: anthropic.Anthropic, gateway: ServerProcess, canary: Canary
) -> None:
    routed = [
        ("api_base", f"{canary.url}/v1"),
        ("base_url", f"{canary.url}/v1"),
        ("api_key", "sk-stolen"),
        ("extra_headers", {"x-upstream": canary.url}),
        ("organization", "org-x"),
    ]
    # Batch lines: refused at validation, naming the field and the line.
    for index, (field, value) in enumerate(routed):
        line = smol_line("x", "hi", **{field: value})
        batch, _, _ = run_batch(oa, [smol_line("ok", "hi"), line])
        assert batch.status == "failed"
        [error] = batch.errors.data
        assert error.line == 2 and error.param == f"body.{field}", (index, error)
    # Realtime OpenAI, for an upstream and for an embedded model.
    for model in ("smol", "local"):
        for field, value in routed:
            response = httpx.post(
                f"{gateway.openai_base_url}/chat/completions",
                headers={"authorization": f"Bearer {API_KEY}"},
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 2,
                    field: value,
                },
                timeout=30,
            )
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == field
    # Anthropic realtime and batch.
    with pytest.raises(anthropic.BadRequestError) as excinfo:
        an.messages.create(
            model="smol",
            max_tokens=2,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"base_url": canary.url},
        )
    assert "base_url" in str(excinfo.value)
    created = an.messages.batches.create(
        requests=[
            {
                "custom_id": "routed",
                "params": {
                    "model": "smol",
                    "max_tokens": 2,
                    "messages": [{"role": "user", "content": "hi"}],
                    "api_base": canary.url,
                },
            }
        ]
    )
    deadline = time.monotonic() + 60
    while an.messages.batches.retrieve(created.id).processing_status != "ended":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    [result] = list(an.messages.batches.results(created.id))
    assert result.result.type == "errored"
    assert "api_base" in result.result.error.error.message
    assert canary.hits == []


def test_realtime_openai_sdk_through_to_the_upstream(oa: openai.OpenAI, proxy: FaultProxy) -> None:
    proxy.reset_stats()
    chat = oa.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
    )
    assert chat.choices[0].message.content and chat.usage and chat.usage.prompt_tokens > 0
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in oa.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": "Say hi."}],
            max_tokens=4,
            stream=True,
        )
        if chunk.choices
    ]
    assert "".join(pieces)
    completion = oa.completions.create(model="smol", prompt="Once upon a time", max_tokens=4)
    assert completion.choices[0].text
    embedding = oa.embeddings.create(model="smol", input="hello")
    assert embedding.data[0].embedding
    with pytest.raises(openai.BadRequestError) as excinfo:
        oa.embeddings.create(model="local", input="hello")
    assert excinfo.value.body["param"] == "model"
    # A final upstream error comes back with the upstream's status and body.
    with pytest.raises(openai.BadRequestError) as excinfo:
        oa.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": FAIL_400_MARKER}], max_tokens=2
        )
    assert excinfo.value.body == json.loads(FAIL_400_BODY)["error"]
    assert len(proxy.seen) == 5  # chat, stream, completion, embedding, refused


def test_realtime_retries_transient_faults(oa: openai.OpenAI, proxy: FaultProxy) -> None:
    proxy.set_faults(Faults(rate_limit=0.3, server_error=0.2, seed=3))
    proxy.reset_stats()
    try:
        for i in range(3):
            chat = oa.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": f"Hi {i}"}], max_tokens=2
            )
            assert chat.choices[0].message.content is not None
    finally:
        proxy.set_faults(Faults())
    assert len(proxy.seen) > 3


def test_anthropic_sdk_batches_and_realtime_against_an_upstream_model(
    an: anthropic.Anthropic, gateway: ServerProcess
) -> None:
    message = an.messages.create(
        model="smol", max_tokens=4, messages=[{"role": "user", "content": "Say hi."}]
    )
    assert message.content[0].text and message.usage.input_tokens > 0
    with an.messages.stream(
        model="smol", max_tokens=4, messages=[{"role": "user", "content": "Say hi."}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text
    created = an.messages.batches.create(
        requests=[
            {
                "custom_id": "a",
                "params": {
                    "model": "smol",
                    "max_tokens": 4,
                    "system": "Be brief.",
                    "messages": [{"role": "user", "content": "Say hi."}],
                },
            },
            {
                "custom_id": "refused",
                "params": {
                    "model": "smol",
                    "max_tokens": 4,
                    "messages": [{"role": "user", "content": FAIL_400_MARKER}],
                },
            },
        ]
    )
    deadline = time.monotonic() + 120
    while an.messages.batches.retrieve(created.id).processing_status != "ended":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    results = {r.custom_id: r.result for r in an.messages.batches.results(created.id)}
    assert results["a"].type == "succeeded"
    assert results["a"].message.content[0].text
    assert results["a"].message.usage.input_tokens > 0
    assert results["refused"].type == "errored"
    assert "upstream refuses this prompt" in results["refused"].error.error.message
    attempts = attempts_by_custom_id(gateway, created.id)
    assert attempts == {"a": 1, "refused": 1}


def test_4xx_other_than_429_is_final_with_the_upstream_status_and_body(
    oa: openai.OpenAI, gateway: ServerProcess, proxy: FaultProxy
) -> None:
    proxy.reset_stats()
    lines = [
        smol_line("conflict", f"{fail_marker(409)} please"),
        smol_line("timeout", f"{fail_marker(408)} please"),
        smol_line("gone", f"{fail_marker(404)} please"),
    ]
    batch, output, errors = run_batch(oa, lines)
    assert batch.status == "completed" and output == []
    by_id = {line["custom_id"]: line["response"] for line in errors}
    for custom_id, status in (("conflict", 409), ("timeout", 408), ("gone", 404)):
        assert by_id[custom_id]["status_code"] == status
        assert by_id[custom_id]["body"] == json.loads(fail_body(status))
    assert attempts_by_custom_id(gateway, batch.id) == {"conflict": 1, "timeout": 1, "gone": 1}
    assert len(proxy.seen) == 3  # each was sent once, never retried
    # Realtime: the same verdict, straight back.
    with pytest.raises(openai.ConflictError) as excinfo:
        oa.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": fail_marker(409)}], max_tokens=2
        )
    assert excinfo.value.body == json.loads(fail_body(409))["error"]
    assert len(proxy.seen) == 4


def arrivals(proxy: FaultProxy, marker: str) -> list[float]:
    return sorted(s.arrived for s in proxy.for_marker(marker))


def test_retry_after_and_growing_backoff_measured_at_the_upstream(
    oa: openai.OpenAI, gateway: ServerProcess, proxy: FaultProxy
) -> None:
    proxy.reset_stats()
    proxy.script("honour-retry-after", ["429:2"])
    try:
        batch, output, _ = run_batch(oa, [smol_line("ra", "honour-retry-after: say hi")])
    finally:
        proxy.set_faults(Faults())
    assert batch.status == "completed" and len(output) == 1
    first, second = arrivals(proxy, "honour-retry-after")
    assert second - first >= 1.9, (first, second)  # Retry-After: 2, from the upstream's clock
    assert attempts_by_custom_id(gateway, batch.id) == {"ra": 2}

    proxy.reset_stats()
    proxy.script("keep-backing-off", ["500", "500", "500"])
    try:
        batch, output, _ = run_batch(oa, [smol_line("bo", "keep-backing-off: say hi")])
    finally:
        proxy.set_faults(Faults())
    assert batch.status == "completed" and len(output) == 1
    times = arrivals(proxy, "keep-backing-off")
    assert len(times) == 4, times
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # Exponential with up to 1 s of jitter: about 1-2 s, 2-3 s, 4-5 s. Lower bounds only, and
    # the last gap beyond both earlier ones: the waits grow.
    assert gaps[0] >= 0.9 and gaps[1] >= 1.9 and gaps[2] >= 3.9, gaps
    assert gaps[2] > max(gaps[0], gaps[1]), gaps
    assert attempts_by_custom_id(gateway, batch.id) == {"bo": 4}


def estimate(seen: Seen, max_tokens: int) -> int:
    """The charge batchd makes before sending (see openai_http._payload)."""
    return math.ceil(len(seen.body) / 4) + max_tokens


def test_tokens_per_minute_bounds_the_usage_the_upstream_reports(
    oa: openai.OpenAI, tpm_proxy: FaultProxy
) -> None:
    """A batch that reports more usage than a minute's budget, kept short: each line starts
    with the same 300 digits, one token each, so it costs the upstream little once that prefix
    is cached (llama.cpp reuses the previous prompt's prefix) but reports about 340 tokens of
    usage, over three times its estimate (characters / 4). The settlement with the reported
    usage is what holds the later lines back. Measured at the proxy, with the usage the
    upstream reported: a request goes up only when the usage already reported in the window
    since any earlier arrival, plus its own estimate, fits the budget plus the refill."""
    prefix = "1234567890" * 30
    # Cache the prefix upstream through another model, outside the measurement.
    oa.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": f"{prefix} Hi."}], max_tokens=1
    )
    tpm_proxy.reset_stats()
    lines = [
        chat_line(f"t{i}", f"{prefix} Say {i}.", model="smol-tpm", max_tokens=1) for i in range(9)
    ]
    batch, output, _ = run_batch(oa, lines)
    assert batch.status == "completed" and len(output) == 9
    seen = sorted(tpm_proxy.seen, key=lambda s: s.arrived)
    assert len(seen) == 9 and all(s.usage_tokens for s in seen), seen
    usage = [s.usage_tokens or 0 for s in seen]
    estimates = [estimate(s, 1) for s in seen]
    assert sum(estimates) < TPM < sum(usage)  # on estimates alone, all would go at once
    rate = TPM / 60
    tolerance = max(estimates)  # one request's estimate
    for i, start in enumerate(seen):
        for j in range(i + 1, len(seen)):
            used = sum(usage[i:j]) + estimates[j]
            allowed = TPM + (seen[j].arrived - start.arrived) * rate + tolerance
            assert used <= allowed, (i, j, used, allowed)
    # The bound was a real one: for the window of all nine to hold they had to spread over
    # this many seconds, several times what the upstream takes to answer them back to back.
    needed = (sum(usage[:-1]) + estimates[-1] - TPM - tolerance) / rate
    assert needed > 5, needed


def test_a_stream_that_reports_usage_settles_the_token_budget(
    oa: openai.OpenAI, self_proxy: FaultProxy
) -> None:
    # 100 digits: one token each, so the estimate (characters / 4) is well below the usage the
    # upstream reports at the end of the stream. Settled with that usage, the debt must hold
    # the next request back; charged the estimate alone, it would go at once.
    # Warm the upstream (the gateway's own embedded model) up, outside the measurement.
    oa.chat.completions.create(
        model="local", messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    self_proxy.reset_stats()
    stream = oa.chat.completions.create(
        model="self-tpm",
        messages=[{"role": "user", "content": "1234567890" * 10 + " -- repeat"}],
        max_tokens=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert usage and usage[-1].prompt_tokens >= 100
    follow = oa.chat.completions.create(
        model="self-tpm", messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    assert follow.choices
    streamed, second = sorted(self_proxy.seen, key=lambda s: s.arrived)
    assert streamed.usage_tokens == usage[-1].total_tokens  # the proxy saw what we saw
    assert estimate(streamed, 1) + estimate(second, 1) < SELF_TPM  # estimates: no wait
    # One slot, so the second is admitted after the stream settled: when the stream's usage,
    # less what leaked since the stream was admitted, plus its own estimate fits the budget.
    rate = SELF_TPM / 60
    spacing = (usage[-1].total_tokens + estimate(second, 1) - SELF_TPM) / rate
    assert spacing >= 6, spacing
    assert second.arrived - streamed.arrived >= spacing - 0.5, (
        second.arrived - streamed.arrived,
        spacing,
    )


def test_unknown_models_are_404_model_not_found_on_every_path(oa: openai.OpenAI) -> None:
    chat = [
        chat_line("plain", "hi", model="no-such-model", max_tokens=2),
        # Fields only the embedded engine refuses must not hide the missing model.
        chat_line("penalties", "hi", model="no-such-model", max_tokens=2, presence_penalty=0.5),
        smol_line("known", "Say hi."),
    ]
    embeddings = [
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": model, "input": "hello"},
        }
        for custom_id, model in (("unknown", "no-such-model"), ("known", "smol"))
    ]
    for lines, endpoint in ((chat, "/v1/chat/completions"), (embeddings, "/v1/embeddings")):
        batch, output, errors = run_batch(oa, lines, endpoint=endpoint)
        assert batch.status == "completed"
        assert [line["custom_id"] for line in output] == ["known"]
        assert output[0]["response"]["status_code"] == 200
        assert errors and len(errors) == len(lines) - 1
        for line in errors:
            assert line["response"]["status_code"] == 404, line
            assert line["response"]["body"]["error"]["code"] == "model_not_found", line
    with pytest.raises(openai.NotFoundError) as excinfo:
        oa.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert excinfo.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as excinfo:
        oa.embeddings.create(model="no-such-model", input="hello")
    assert excinfo.value.body["code"] == "model_not_found"


def test_realtime_and_batch_share_the_concurrency_limit(
    oa: openai.OpenAI, proxy: FaultProxy
) -> None:
    proxy.reset_stats()
    batch = oa.batches.create(
        input_file_id=upload(oa, [smol_line(f"b{i}", f"batch line {i}") for i in range(6)]),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    deadline = time.monotonic() + 120
    while proxy.count() == 0:  # the batch is running upstream
        assert time.monotonic() < deadline
        time.sleep(0.05)

    def realtime(i: int) -> str | None:
        answer = oa.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": f"realtime {i}"}], max_tokens=2
        )
        return answer.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(realtime, range(4)))
    assert all(answer is not None for answer in answers)
    batch = wait_for(oa, batch.id, timeout=240)
    assert batch.status == "completed" and batch.request_counts.completed == 6
    by_kind = {"batch": arrivals(proxy, "batch line"), "realtime": arrivals(proxy, "realtime")}
    # (On a loaded machine an attempt may pass the 8 s timeout and be sent again.)
    assert len({s.body for s in proxy.for_marker("batch line")}) == 6
    assert len({s.body for s in proxy.for_marker("realtime")}) == 4
    # The realtime requests went up while the batch was still sending...
    assert by_kind["realtime"][0] < by_kind["batch"][-1]
    # ...and the two together never had more than the limit in flight.
    assert proxy.max_inflight == FAULTY_CONCURRENCY


def test_a_stream_whose_client_leaves_gives_its_slot_back(
    gateway: ServerProcess, oa: openai.OpenAI, one_proxy: FaultProxy
) -> None:
    one_proxy.reset_stats()
    one_proxy.set_faults(Faults(stall_mid_stream=True, stall_seconds=240))
    headers = {"authorization": f"Bearer {API_KEY}"}
    body = {
        "model": "smol-one",
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 16,
        "stream": True,
    }
    try:
        with httpx.stream(
            "POST",
            f"{gateway.openai_base_url}/chat/completions",
            json=body,
            headers=headers,
            timeout=120,
        ) as response:
            assert response.status_code == 200
            first = next(line for line in response.iter_lines() if line.startswith("data:"))
            assert "chat.completion.chunk" in first
            # The upstream now sends nothing for 240 s; we hang up instead of waiting.
    finally:
        one_proxy.set_faults(Faults())
    # batchd closed its upstream connection when we left (the proxy saw the hang-up long
    # before its stall ended) ...
    [stalled] = one_proxy.seen
    deadline = time.monotonic() + 60
    while stalled.ended is None:
        assert time.monotonic() < deadline, "the abandoned stream was never closed upstream"
        time.sleep(0.1)
    # ... and gave back the model's one slot: the next request is answered, not stuck behind it.
    answer = oa.with_options(timeout=90).chat.completions.create(
        model="smol-one", messages=[{"role": "user", "content": "Say hi."}], max_tokens=2
    )
    assert answer.choices[0].message.content is not None
    assert len(one_proxy.seen) == 2 and one_proxy.max_inflight == 1


def test_engines_check_probes_each_upstream(
    tmp_path: Path, proxy: FaultProxy, limited_proxy: FaultProxy
) -> None:
    def check(text: str) -> subprocess.CompletedProcess[str]:
        config = tmp_path / "check.toml"
        config.write_text(text)
        return subprocess.run(
            [sys.executable, "-m", "batchd.cli", "engines", "check", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env={"UPSTREAM_TEST_KEY": UPSTREAM_KEY, "PATH": "/usr/bin:/bin"},
        )

    everything = check(registry_toml(proxy, limited_proxy, free_port()))
    assert everything.returncode == 1, everything.stderr
    assert "down" in everything.stdout and "unreachable" in everything.stdout
    assert f"serves {UPSTREAM_MODEL}" in everything.stdout
    healthy = registry_toml(proxy, limited_proxy, 1).split("[models.down]")[0]
    ok = check(healthy)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = check(healthy.replace("max_concurrency = 1", "max_concurrency = -1"))
    assert bad.returncode == 2
    assert "models.smol-limited.max_concurrency" in bad.stderr


def test_serve_refuses_a_bad_config_with_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        '[models.x]\nengine = "openai-http"\nbase_url = "http://h/v1"\n'
        'api_key_env = "NOT_SET_ANYWHERE_123"\n'
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "batchd.cli",
            "serve",
            "--config",
            str(config),
            "--data-dir",
            str(tmp_path / "d"),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "models.x.api_key_env" in done.stderr and "NOT_SET_ANYWHERE_123" in done.stderr


def responses_every_way(
    oa: openai.OpenAI, model: str, tag: str
) -> tuple[Any, list[dict[str, Any]]]:
    """One Responses request plain, one streamed, and a batch of two, through ``model``: the
    plain response and the batch's output rows, once each has been checked."""
    response = oa.responses.create(
        model=model, instructions="Be brief.", input="Say hi.", max_output_tokens=4
    )
    assert response.id.startswith("resp_") and response.output_text
    assert response.usage is not None and response.usage.input_tokens > 0
    assert response.status in ("completed", "incomplete")
    events = list(
        oa.responses.create(model=model, input="Say hi.", max_output_tokens=4, stream=True)
    )
    assert events[0].type == "response.created"
    assert events[-1].type in ("response.completed", "response.incomplete")
    lines = [
        {
            "custom_id": f"{tag}-{i}",
            "method": "POST",
            "url": "/v1/responses",
            "body": {"model": model, "input": f"Name a color, {i}.", "max_output_tokens": 4},
        }
        for i in range(2)
    ]
    batch, output, errors = run_batch(oa, lines, endpoint="/v1/responses")
    assert batch.status == "completed" and errors == []
    assert sorted(row["custom_id"] for row in output) == [f"{tag}-0", f"{tag}-1"]
    for row in output:
        body = row["response"]["body"]
        assert body["object"] == "response" and body["output"][0]["content"][0]["text"]
    assert batch.usage is not None and batch.usage.input_tokens > 0
    return response, output


def test_responses_for_an_upstream_model_are_sent_as_chat_completions(
    oa: openai.OpenAI, proxy: FaultProxy
) -> None:
    # llama-cpp-python's server has no /v1/responses: batchd translates, realtime and batch.
    proxy.reset_stats()
    responses_every_way(oa, "smol", "r")
    # Four requests (a slow upstream may see a retry past the model's timeout), all chat.
    assert {seen.path for seen in proxy.seen} == {"/v1/chat/completions"}
    assert len(proxy.seen) >= 4


def test_responses_go_natively_to_an_upstream_configured_for_them(
    oa: openai.OpenAI, native_proxy: FaultProxy
) -> None:
    # self-native's upstream (this gateway's own embedded model, as vLLM would be) serves
    # /v1/responses: bodies go there as they are, and its response objects come back.
    native_proxy.reset_stats()
    response, output = responses_every_way(oa, "self-native", "n")
    assert response.model == "local"  # the upstream's own answer, as it sent it
    for row in output:
        body = row["response"]["body"]
        assert body["model"] == "local" and body["usage"]["input_tokens"] > 0
    assert {seen.path for seen in native_proxy.seen} == {"/v1/responses"}
    assert len(native_proxy.seen) == 4
