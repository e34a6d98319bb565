"""Upstream engines end to end: a real ``batchd serve --config`` in front of a real
OpenAI-compatible server (llama-cpp-python's own, on the bundled model), with a fault-injecting
proxy between them and a canary that must never be reached. Driven by the official SDKs."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import API_KEY, chat_line, read_jsonl, upload, wait_for
from tests.faultproxy import FAIL_400_BODY, FAIL_400_MARKER, Canary, FaultProxy, Faults
from tests.serverproc import ServerProcess, free_port, running_server
from tests.upstreamproc import UPSTREAM_MODEL, llama_server

UPSTREAM_KEY = "sk-upstream-test-key"
FAULTY_CONCURRENCY = 2
LIMITED_RPM = 60  # one request a second


def closed_port() -> int:
    """A port nobody listens on: connecting is refused at once (an upstream that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with llama_server(tmp_path_factory.mktemp("llama-server"), embedding=True) as url:
        yield url


@pytest.fixture(scope="module")
def proxy(upstream: str) -> Iterator[FaultProxy]:
    p = FaultProxy(upstream).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def limited_proxy(upstream: str) -> Iterator[FaultProxy]:
    p = FaultProxy(upstream).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def pool(upstream: str) -> Iterator[tuple[FaultProxy, FaultProxy]]:
    first, second = FaultProxy(upstream).start(), FaultProxy(upstream).start()
    yield first, second
    first.stop()
    second.stop()


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


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    proxy: FaultProxy,
    limited_proxy: FaultProxy,
    pool: tuple[FaultProxy, FaultProxy],
) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("gateway")
    config = root / "batchd.toml"
    config.write_text(registry_toml(proxy, limited_proxy, closed_port(), pool))
    with running_server(
        root / "data",
        BATCHD_API_KEYS=API_KEY,
        BATCHD_CONFIG=str(config),
        UPSTREAM_TEST_KEY=UPSTREAM_KEY,
    ) as server:
        yield server


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
        "smol": "openai-http",
        "smol-limited": "openai-http",
        "smol-pool": "openai-http",
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
    try:
        lines = [smol_line(f"f{i}", f"Name a colour, {i}.") for i in range(12)]
        batch, output, errors = run_batch(oa, lines, timeout=300)
    finally:
        proxy.set_faults(Faults())
    assert batch.status == "completed", batch
    assert errors == []
    assert sorted(line["custom_id"] for line in output) == sorted(f"f{i}" for i in range(12))
    assert all(line["response"]["status_code"] == 200 for line in output)
    outcomes = [s.outcome for s in proxy.seen]
    for fault in ("429", "500", "reset", "stall"):
        assert fault in outcomes, outcomes  # every fault kind was met
    attempts = attempts_by_custom_id(gateway, batch.id)
    # Every attempt the upstream side saw is accounted to exactly one request.
    assert sum(attempts.values()) == len(proxy.seen)
    assert max(attempts.values()) > 1 and min(attempts.values()) >= 1
    assert proxy.max_inflight <= FAULTY_CONCURRENCY


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
