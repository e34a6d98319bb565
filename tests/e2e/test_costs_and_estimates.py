"""Cost and saving on both surfaces' batch objects (read through the official SDKs), the
estimate before submitting (HTTP and CLI) against what the batch then used, per-day totals,
and the console API's admin views, on a real server with the real engine."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.support.helpers import (
    chat_line,
    create_message_batch,
    eventually,
    jsonl,
    upload,
    wait_for,
)
from tests.support.serverproc import ServerProcess, running_server

ALICE = "alice-key-0001"
BOB = "bob-key-00001"
OPS = "ops-key-00001"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("costs")
    keys = root / "keys.txt"
    keys.write_text(f"{ALICE} alice\n{BOB} bob\n{OPS} ops admin\n")
    prices = root / "prices.toml"
    # A model table of its own for the bundled model: the objects must use it, not the default.
    prices.write_text(
        'currency = "EUR"\n[models.smollm2-135m-instruct]\n'
        "input = 1.0\ncached_input = 0.5\noutput = 4.0\nbatch_discount = 0.5\n"
    )
    with running_server(
        root / "data", BATCHD_KEYS_FILE=str(keys), BATCHD_PRICES_FILE=str(prices)
    ) as srv:
        yield srv


def _client(server: ServerProcess, key: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_base_url, api_key=key, max_retries=0)


def _headers(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _lines(n: int) -> list[dict[str, object]]:
    return [chat_line(f"r{i}", f"Name a fruit number {i}.", max_tokens=6) for i in range(n)]


def test_the_estimate_counts_exactly_the_prompt_tokens_the_batch_then_uses(
    server: ServerProcess,
) -> None:
    client = _client(server)
    data = jsonl(_lines(6))
    estimate = httpx.post(
        server.url + "/v1/batches/estimate",
        content=data,
        headers={**_headers(ALICE), "content-type": "application/jsonl"},
        timeout=60,
    ).json()
    assert estimate["object"] == "batch.estimate"
    assert estimate["requests"] == 6
    assert estimate["input_tokens_exact"] is True
    assert estimate["output_tokens"]["max"] == 36
    assert estimate["cost"]["currency"] == "EUR"

    file_id = upload(client, data)
    # The same estimate for the uploaded file, through the SDK's own request helper.
    by_file = client.post(
        "/batches/estimate", body={"input_file_id": file_id}, cast_to=httpx.Response
    ).json()
    assert by_file["input_tokens"] == estimate["input_tokens"]

    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_for(client, batch.id)
    assert done.status == "completed"
    assert done.usage is not None
    assert done.usage.input_tokens == estimate["input_tokens"]  # counted, not guessed

    # Now a batch has run: the next estimate has a measured throughput and a time.
    again = client.post(
        "/batches/estimate", body={"input_file_id": file_id}, cast_to=httpx.Response
    ).json()
    assert again["time"]["seconds"] is not None and again["time"]["seconds"] > 0
    assert again["time"]["throughput_tokens_per_second"] > 0
    assert again["models"]["smollm2-135m-instruct"]["measured_output_per_request"] > 0


def test_both_surfaces_batch_objects_carry_cost_and_saving_at_the_models_prices(
    server: ServerProcess,
) -> None:
    client = _client(server)
    batch = client.batches.create(
        input_file_id=upload(client, _lines(3)),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = wait_for(client, batch.id)
    extension = (done.model_extra or {})["batchd"]
    usage = done.usage
    assert usage is not None
    cached = usage.input_tokens_details.cached_tokens
    realtime = (
        (usage.input_tokens - cached) * 1.0 + cached * 0.5 + usage.output_tokens * 4.0
    ) / 1e6
    cost = extension["cost"]
    assert cost["currency"] == "EUR"
    assert cost["realtime"] == pytest.approx(realtime, abs=2e-6)
    assert cost["batch"] == pytest.approx(realtime / 2, abs=2e-6)
    assert cost["saving_percent"] == 50.0
    listed = client.batches.list(limit=5).data
    assert all("batchd" in (b.model_extra or {}) for b in listed)

    messages = anthropic.Anthropic(base_url=server.url, api_key=ALICE, max_retries=0)
    message_batch_id = create_message_batch(server.url, key=ALICE)
    eventually(
        lambda: messages.messages.batches.retrieve(message_batch_id).processing_status == "ended",
        "the message batch ends",
    )
    message_batch = messages.messages.batches.retrieve(message_batch_id)
    extension = (message_batch.model_extra or {})["batchd"]
    assert extension["usage"]["output_tokens"] > 0
    assert extension["cost"]["batch"] > 0


def test_per_day_totals_are_the_tenants_own(server: ServerProcess) -> None:
    client = _client(server, BOB)
    batch = client.batches.create(
        input_file_id=upload(client, _lines(2)),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    assert wait_for(client, batch.id).status == "completed"
    bob = httpx.get(server.url + "/console/api/usage", headers=_headers(BOB)).json()
    [day] = bob["data"]
    assert (day["batches"], day["requests"]) == (1, 2)
    assert day["cost"]["saving"] > 0
    everyone = httpx.get(
        server.url + "/console/api/usage?all_tenants=true", headers=_headers(OPS)
    ).json()
    assert everyone["data"][0]["requests"] > 2
    refused = httpx.get(server.url + "/console/api/usage?all_tenants=true", headers=_headers(BOB))
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"


def test_the_console_api_keeps_tenants_apart_and_operators_views_to_admins(
    server: ServerProcess,
) -> None:
    me = httpx.get(server.url + "/console/api/me", headers=_headers(OPS)).json()
    assert me == {"tenant": "ops", "admin": True}
    assert httpx.get(server.url + "/console/api/me").status_code == 401
    engines = httpx.get(server.url + "/console/api/engines", headers=_headers(ALICE))
    assert engines.status_code == 403
    view = httpx.get(server.url + "/console/api/engines", headers=_headers(OPS)).json()
    assert "smollm2-135m-instruct" in [m["id"] for m in view["models"]]
    assert len(view["activity"]["points"]) == 60
    assert view["activity"]["batch_tokens"] > 0  # the batches of the tests above

    alice = httpx.get(server.url + "/console/api/batches", headers=_headers(ALICE)).json()
    bob = httpx.get(server.url + "/console/api/batches", headers=_headers(BOB)).json()
    alice_ids = {b["id"] for b in alice["data"]}
    assert alice_ids and alice_ids.isdisjoint(b["id"] for b in bob["data"])
    some_id = next(iter(alice_ids))
    assert (
        httpx.get(server.url + f"/console/api/batches/{some_id}", headers=_headers(BOB)).status_code
        == 404
    )
    page = httpx.get(
        server.url + f"/console/api/batches/{some_id}", headers=_headers(OPS)
    ).json()  # an admin opens any tenant's batch
    assert page["id"] == some_id and page["timeline"][0]["status"] == "created"
    everyone = httpx.get(
        server.url + "/console/api/batches?all_tenants=true", headers=_headers(OPS)
    ).json()
    assert alice_ids <= {b["id"] for b in everyone["data"]}
    bad = httpx.get(server.url + "/console/api/batches?status=done", headers=_headers(ALICE))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "status"


def test_a_bad_file_is_refused_naming_its_line_and_the_server_keeps_serving(
    server: ServerProcess,
) -> None:
    data = jsonl(_lines(2)) + b'{"custom_id": "x", "method": "POST"}\n'
    refused = httpx.post(
        server.url + "/v1/batches/estimate",
        content=data,
        headers={**_headers(ALICE), "content-type": "application/jsonl"},
    )
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["message"].startswith("Line 3:") and error["param"] == "url"
    missing = httpx.post(
        server.url + "/v1/batches/estimate",
        json={"input_file_id": "file-nope"},
        headers=_headers(ALICE),
    )
    assert missing.status_code == 404
    assert httpx.get(server.url + "/console/api/me", headers=_headers(ALICE)).status_code == 200


def _cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchd.cli", *args, "--url", server.url, "--api-key", ALICE],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_cli_estimates_a_file_and_shows_cost_in_status_and_usage(
    server: ServerProcess, tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl(_lines(4)))
    shown = _cli(server, "estimate", str(source), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["requests"] == 4
    table = _cli(server, "estimate", str(source))
    assert table.returncode == 0 and "prompt tokens" in table.stdout and "EUR" in table.stdout
    client = _client(server)
    batch_id = client.batches.list(limit=1).data[0].id
    status = _cli(server, "status", batch_id)
    assert status.returncode == 0 and "at batch prices" in status.stdout
    usage = _cli(server, "usage")
    assert usage.returncode == 0 and "EUR" in usage.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"custom_id": "x"}\n')
    refused = _cli(server, "estimate", str(bad))
    assert refused.returncode == 1 and "Line 1" in refused.stderr
