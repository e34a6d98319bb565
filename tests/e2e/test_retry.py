"""Retrying a batch's failed requests (``POST /v1/batches/{id}/retry``, the Anthropic twin and
``batchd retry``) against a real server running the real engine: a batch cancelled midway
and its retry together answer every custom_id exactly once."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from openai.types import Batch

from tests.e2e.test_cli import batchd
from tests.support.helpers import API_KEY, chat_line, create_message_batch, read_jsonl, upload
from tests.support.helpers import wait_for as wait_for_batch
from tests.support.serverproc import ServerProcess

ANTHROPIC_HEADERS = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}


def retry(client: openai.OpenAI, batch_id: str) -> Batch:
    return client.post(f"/batches/{batch_id}/retry", cast_to=Batch, body={})


def create(client: openai.OpenAI, lines: list[dict[str, Any]]) -> Batch:
    return client.batches.create(
        input_file_id=upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "retry-e2e"},
    )


def test_a_cancelled_batch_and_its_retry_answer_every_custom_id_once(
    client: openai.OpenAI,
) -> None:
    lines = [
        chat_line(f"r-{i}", f"Write a long story about a robot named {i}.", max_tokens=24)
        for i in range(60)
    ]
    batch = create(client, lines)
    batch = wait_for_batch(client, batch.id, ("in_progress", "completed"), timeout=120)
    while batch.request_counts.completed < 1 and batch.status == "in_progress":
        time.sleep(0.05)
        batch = client.batches.retrieve(batch.id)
    client.batches.cancel(batch.id)
    first = wait_for_batch(client, batch.id, timeout=60)
    assert first.status == "cancelled", first
    first_output = read_jsonl(client, first.output_file_id)
    first_errors = read_jsonl(client, first.error_file_id)
    assert first_output and first_errors, "a cancel this early leaves both kinds of lines"

    again = retry(client, first.id)
    assert again.id != first.id and again.status == "validating"
    assert again.metadata == {"run": "retry-e2e", "retry_of": first.id}
    assert (again.endpoint, again.completion_window) == (first.endpoint, first.completion_window)
    # Its input holds the original lines of exactly the requests that did not succeed.
    retried = client.files.content(again.input_file_id).text.splitlines()
    by_id = {line["custom_id"]: line for line in lines}
    assert [json.loads(r) for r in retried] == [by_id[row["custom_id"]] for row in first_errors]

    second = wait_for_batch(client, again.id, timeout=300)
    assert second.status == "completed", second
    assert second.request_counts.total == len(first_errors)
    assert second.error_file_id is None
    second_output = read_jsonl(client, second.output_file_id)
    answered = Counter(row["custom_id"] for row in first_output + second_output)
    assert answered == Counter(line["custom_id"] for line in lines)  # each exactly once
    assert all(row["response"]["status_code"] == 200 for row in first_output + second_output)

    listed = {b.id: b for b in client.batches.list(limit=5)}
    assert listed[again.id].metadata == again.metadata


def test_nothing_to_retry_and_unknown_batches_answer_in_openais_shape(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    done = create(client, [chat_line("only", "Say hi.", max_tokens=2)])
    done = wait_for_batch(client, done.id, timeout=120)
    assert done.status == "completed"
    with pytest.raises(openai.BadRequestError) as refused:
        retry(client, done.id)
    assert refused.value.body == {
        "message": f"Batch {done.id} has no failed, expired or cancelled requests to retry.",
        "type": "invalid_request_error",
        "param": "batch_id",
        "code": "invalid_value",
    }
    with pytest.raises(openai.NotFoundError) as missing:
        retry(client, "batch_nope")
    assert isinstance(missing.value.body, dict) and missing.value.body["param"] == "batch_id"
    # Another tenant's batch is as unknown as one that never was.
    theirs = httpx.post(
        f"{server.openai_base_url}/batches/{done.id}/retry",
        headers={"authorization": "Bearer test-key-beta"},
        timeout=30,
    )
    assert theirs.status_code == 404, theirs.text


def test_an_idempotency_key_makes_one_retry(client: openai.OpenAI) -> None:
    batch = create(client, [chat_line("bad", "Hi", model="no-such-model"), chat_line("ok", "Hi")])
    batch = wait_for_batch(client, batch.id, timeout=120)
    assert batch.status == "completed" and batch.request_counts.failed == 1
    headers = {"Idempotency-Key": f"retry-{batch.id}"}
    first = client.post(
        f"/batches/{batch.id}/retry", cast_to=Batch, body={}, options={"headers": headers}
    )
    again = client.post(
        f"/batches/{batch.id}/retry", cast_to=Batch, body={}, options={"headers": headers}
    )
    assert again.id == first.id
    first = wait_for_batch(client, first.id, timeout=120)
    errors = read_jsonl(client, first.error_file_id)
    assert [row["custom_id"] for row in errors] == ["bad"]  # the model still does not exist
    assert errors[0]["response"]["status_code"] == 404


def wait_ended(claude: anthropic.Anthropic, batch_id: str, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while (batch := claude.messages.batches.retrieve(batch_id)).processing_status != "ended":
        assert time.monotonic() < deadline, f"{batch_id} still {batch.processing_status}"
        time.sleep(0.2)
    return batch


def ask(custom_id: str, content: str, model: str = "default") -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "params": {
            "model": model,
            "max_tokens": 24,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
        },
    }


def test_a_message_batch_retry_takes_its_errored_and_canceled_requests(
    server: ServerProcess,
) -> None:
    claude = anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0)
    requests = [ask("m-bad", "Hi", model="no-such-model")] + [
        ask(f"m-{i}", f"Write a long story about a cat named {i}.") for i in range(40)
    ]
    made = claude.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    while (made := claude.messages.batches.retrieve(made.id)).request_counts.succeeded < 1:
        time.sleep(0.05)
    claude.messages.batches.cancel(made.id)
    first = wait_ended(claude, made.id)
    outcomes = {r.custom_id: r.result.type for r in claude.messages.batches.results(first.id)}
    assert outcomes["m-bad"] == "errored"
    assert "canceled" in outcomes.values(), "a cancel this early leaves unstarted requests"
    not_succeeded = {c for c, kind in outcomes.items() if kind != "succeeded"}

    answer = httpx.post(
        f"{server.url}/v1/messages/batches/{first.id}/retry", headers=ANTHROPIC_HEADERS, timeout=60
    )
    assert answer.status_code == 200, answer.text
    again = answer.json()
    assert again["type"] == "message_batch" and again["id"] != first.id
    assert again["request_counts"]["processing"] + again["request_counts"]["succeeded"] == len(
        not_succeeded
    )
    wait_ended(claude, again["id"])
    retried = {r.custom_id: r.result.type for r in claude.messages.batches.results(again["id"])}
    assert set(retried) == not_succeeded
    assert retried["m-bad"] == "errored"  # the model still does not exist
    succeeded = [c for c, kind in [*outcomes.items(), *retried.items()] if kind == "succeeded"]
    assert sorted(succeeded) == sorted(r["custom_id"] for r in requests[1:])  # each once


def test_a_message_batch_with_nothing_to_retry_answers_in_anthropics_shape(
    server: ServerProcess,
) -> None:
    claude = anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0)
    batch_id = create_message_batch(server.url, "fine")
    wait_ended(claude, batch_id)
    refused = httpx.post(
        f"{server.url}/v1/messages/batches/{batch_id}/retry", headers=ANTHROPIC_HEADERS, timeout=60
    )
    assert refused.status_code == 400
    body = refused.json()
    assert body["type"] == "error" and body["error"] == {
        "type": "invalid_request_error",
        "message": f"Message batch {batch_id} has no errored, expired or canceled requests to"
        " retry.",
    }
    missing = httpx.post(
        f"{server.url}/v1/messages/batches/msgbatch_nope/retry",
        headers=ANTHROPIC_HEADERS,
        timeout=60,
    )
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_cli_retry_prints_the_new_id_and_waits_for_it(
    client: openai.OpenAI, server: ServerProcess, tmp_path: Path
) -> None:
    batch = create(
        client, [chat_line("cli-bad", "Hi", model="no-such-model"), chat_line("cli-ok", "Hi")]
    )
    batch = wait_for_batch(client, batch.id, timeout=120)
    assert batch.status == "completed"

    started = batchd(server.url, "retry", batch.id)
    assert started.returncode == 0, started.stderr
    new_id = started.stdout.strip()  # stdout holds only the id
    assert new_id.startswith("batch_") and new_id != batch.id
    assert client.batches.retrieve(new_id).metadata == {"run": "retry-e2e", "retry_of": batch.id}

    target = tmp_path / "again.jsonl"
    waited = batchd(server.url, "retry", batch.id, "--wait", "-o", str(target))
    assert waited.returncode == 0, waited.stderr  # completed, its one line an error line
    assert "0 completed, 1 failed, 1 total" in waited.stderr
    assert not target.exists()
    errors = [json.loads(x) for x in (tmp_path / "again.errors.jsonl").read_text().splitlines()]
    assert [row["custom_id"] for row in errors] == ["cli-bad"]

    good = wait_for_batch(client, create(client, [chat_line("fine", "Hi", max_tokens=2)]).id)
    refused = batchd(server.url, "retry", good.id)
    assert refused.returncode == 1 and not refused.stdout
    assert "has no failed, expired or cancelled requests to retry. (HTTP 400)" in refused.stderr
