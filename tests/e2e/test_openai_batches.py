"""The OpenAI Files + Batch API, driven by the official openai SDK against a real server
running the real engine on the bundled model."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.support.helpers import (
    API_KEY,
    OTHER_KEY,
    chat_line,
    jsonl,
    read_jsonl,
    upload,
    wait_for,
)
from tests.support.serverproc import ServerProcess

BATCH_KEYS = {
    "id", "object", "endpoint", "model", "errors", "input_file_id", "completion_window", "status",
    "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at",
    "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at",
    "request_counts", "usage", "metadata",
}  # fmt: skip
EXTENSION_KEYS = {"batchd"}  # ours: usage, cost and saving (docs/console.md); SDKs keep it


def test_batch_runs_to_completion_with_real_answers(client: openai.OpenAI) -> None:
    lines = [chat_line(f"q-{i}", f"What is {i} plus {i}? Answer briefly.") for i in range(6)]
    lines.append(
        {
            "custom_id": "legacy",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "smollm2-135m-instruct",
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": [{"type": "text", "text": "Say hi."}]},
                ],
                "max_completion_tokens": 6,
                "temperature": 0.7,
                "seed": 7,
            },
        }
    )
    file_id = upload(client, lines)
    batch = client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "e2e"},
    )
    assert batch.status == "validating"
    assert batch.expires_at == batch.created_at + 24 * 3600
    batch = wait_for(client, batch.id)

    assert batch.status == "completed", batch
    assert batch.request_counts.total == 7
    assert batch.request_counts.completed == 7
    assert batch.request_counts.failed == 0
    assert batch.error_file_id is None
    assert batch.metadata == {"job": "e2e"}
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    raw = client.batches.with_raw_response.retrieve(batch.id).http_response.json()
    assert set(raw) == BATCH_KEYS | EXTENSION_KEYS

    output = read_jsonl(client, batch.output_file_id)
    assert [row["custom_id"] for row in output] == [line["custom_id"] for line in lines]
    prompt_total = completion_total = 0
    for row in output:
        assert row["id"].startswith("batch_req_")
        assert row["error"] is None
        assert row["response"]["status_code"] == 200
        body = row["response"]["body"]
        assert body["object"] == "chat.completion"
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert choice["message"]["content"].strip(), "the model produced no text"
        assert choice["finish_reason"] in ("stop", "length")
        usage = body["usage"]
        assert usage["completion_tokens"] <= 8
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        prompt_total += usage["prompt_tokens"]
        completion_total += usage["completion_tokens"]
    assert batch.usage is not None
    assert batch.usage.input_tokens == prompt_total
    assert batch.usage.output_tokens == completion_total
    assert batch.usage.total_tokens == prompt_total + completion_total

    output_file = client.files.retrieve(batch.output_file_id)
    assert output_file.purpose == "batch_output"


def test_completions_endpoint_batch(client: openai.OpenAI) -> None:
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "default", "prompt": f"The number {i} is", "max_tokens": 5},
        }
        for i in range(3)
    ]
    batch = client.batches.create(
        input_file_id=upload(client, lines), endpoint="/v1/completions", completion_window="1h"
    )
    batch = wait_for(client, batch.id)
    assert batch.status == "completed"
    output = read_jsonl(client, batch.output_file_id)
    assert {row["custom_id"] for row in output} == {"c0", "c1", "c2"}
    for row in output:
        body = row["response"]["body"]
        assert body["object"] == "text_completion"
        assert body["usage"]["completion_tokens"] <= 5


def test_structural_problems_fail_the_batch_with_line_numbers(client: openai.OpenAI) -> None:
    good = chat_line("ok-1", "hi")
    data = b"\n".join(
        [
            json.dumps(good).encode(),  # 1
            b'{"custom_id": "broken", ',  # 2 invalid JSON
            json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}).encode(),  # 3
            json.dumps(chat_line("ok-1", "again")).encode(),  # 4 duplicate custom_id
            json.dumps({**chat_line("u", "x"), "url": "/v1/embeddings"}).encode(),  # 5 wrong url
            json.dumps(chat_line("s", "x", stream=True)).encode(),  # 6 stream: true
            json.dumps({**chat_line("m", "x"), "method": "GET"}).encode(),  # 7 wrong method
            b"[1, 2, 3]",  # 8 not an object
        ]
    )
    batch = client.batches.create(
        input_file_id=upload(client, data), endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = wait_for(client, batch.id)
    assert batch.status == "failed"
    assert batch.failed_at is not None
    assert batch.output_file_id is None and batch.error_file_id is None
    assert batch.request_counts.total == 0
    found = [(e.line, e.code, e.param) for e in batch.errors.data]
    assert found == [
        (2, "invalid_json_line", None),
        (3, "missing_required_parameter", "custom_id"),
        (4, "duplicate_custom_id", "custom_id"),
        (5, "invalid_url", "url"),
        (6, "streaming_unsupported", "body.stream"),
        (7, "invalid_request", "method"),
        (8, "invalid_json_line", None),
    ]
    assert all(e.message for e in batch.errors.data)


def test_bad_request_bodies_become_error_lines_and_siblings_complete(
    client: openai.OpenAI,
) -> None:
    lines = [
        chat_line("good-1", "Name a color."),
        chat_line("unknown-model", "hi", model="no-such-model"),
        chat_line("too-long", "hi", max_tokens=1_000_000),
        {
            "custom_id": "image",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "default",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                    }
                ],
            },
        },
        {
            "custom_id": "no-messages",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "default", "messages": []},
        },
        chat_line("bad-temperature", "hi", temperature=7),
        chat_line("good-2", "Name a fruit."),
    ]
    batch = client.batches.create(
        input_file_id=upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    batch = wait_for(client, batch.id)
    assert batch.status == "completed"
    assert batch.request_counts.total == 7
    assert batch.request_counts.completed == 2
    assert batch.request_counts.failed == 5
    output = {row["custom_id"]: row for row in read_jsonl(client, batch.output_file_id)}
    errors = {row["custom_id"]: row for row in read_jsonl(client, batch.error_file_id)}
    assert set(output) == {"good-1", "good-2"}
    assert set(errors) == {"unknown-model", "too-long", "image", "no-messages", "bad-temperature"}
    for row in errors.values():
        assert row["error"] is None
        assert 400 <= row["response"]["status_code"] < 500
        error = row["response"]["body"]["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
    assert errors["unknown-model"]["response"]["status_code"] == 404
    assert errors["unknown-model"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert errors["too-long"]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert errors["image"]["response"]["body"]["error"]["param"] == "messages[0].content[0]"
    assert errors["no-messages"]["response"]["body"]["error"]["param"] == "messages"
    assert errors["bad-temperature"]["response"]["body"]["error"]["param"] == "temperature"


def test_cancel_mid_run_keeps_finished_results(client: openai.OpenAI) -> None:
    lines = [
        chat_line(f"c-{i}", f"Write a long story about a dragon named {i}.", max_tokens=96)
        for i in range(48)
    ]
    batch = client.batches.create(
        input_file_id=upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    batch = wait_for(client, batch.id, ("in_progress", "completed"), timeout=120)
    while batch.request_counts.completed < 1 and batch.status == "in_progress":
        batch = client.batches.retrieve(batch.id)
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    assert cancelled.cancelling_at is not None
    again = client.batches.cancel(batch.id)  # cancelling twice is harmless
    assert again.status in ("cancelling", "cancelled")
    batch = wait_for(client, batch.id, timeout=60)
    assert batch.status == "cancelled"
    assert batch.cancelled_at is not None
    output = read_jsonl(client, batch.output_file_id)
    errors = read_jsonl(client, batch.error_file_id)
    ids_seen = [row["custom_id"] for row in output + errors]
    assert sorted(ids_seen) == sorted(line["custom_id"] for line in lines)  # each exactly once
    assert len(output) >= 1
    assert len(errors) >= 1, "a cancel this early must leave unexecuted lines"
    for row in errors:
        assert row["response"] is None
        assert row["error"]["code"] == "batch_cancelled"
    counts = batch.request_counts
    assert counts.total == 48 and counts.completed == len(output)
    assert counts.completed + counts.failed == counts.total

    assert client.batches.cancel(batch.id).status == "cancelled"  # still harmless once ended


def test_create_batch_rejects_bad_parameters(client: openai.OpenAI) -> None:
    file_id = upload(client, [chat_line("a", "hi")])
    bad = [
        ({"completion_window": "8d"}, "completion_window"),
        ({"completion_window": "30s"}, "completion_window"),
        ({"completion_window": "soon"}, "completion_window"),
        ({"endpoint": "/v1/nope"}, "endpoint"),
        ({"input_file_id": "file-doesnotexist"}, "input_file_id"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ]
    for override, param in bad:
        args = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            **override,
        }
        with pytest.raises(openai.BadRequestError) as excinfo:
            client.batches.create(**args)
        assert excinfo.value.body["param"] == param, override
        assert excinfo.value.body["type"] == "invalid_request_error"
    for window in ("1m", "90m", "7d"):
        batch = client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window=window
        )
        assert batch.completion_window == window


def test_upload_refusals(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.files.create(file=("data.csv", b"a,b\n"), purpose="batch")
    assert ".jsonl" in excinfo.value.message
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.files.create(file=("empty.jsonl", b""), purpose="batch")
    assert excinfo.value.body["param"] == "file"


def test_file_list_retrieve_content_delete(client: openai.OpenAI) -> None:
    data = jsonl([chat_line("x", "hello")])
    created = [client.files.create(file=(f"f{i}.jsonl", data), purpose="batch") for i in range(3)]
    fetched = client.files.retrieve(created[0].id)
    assert fetched.filename == "f0.jsonl" and fetched.bytes == len(data)
    assert fetched.expires_at == fetched.created_at + 30 * 24 * 3600
    assert client.files.content(created[1].id).content == data

    page = client.files.list(limit=2, purpose="batch")
    assert len(page.data) == 2 and page.has_more
    assert page.data[0].id == created[2].id  # newest first
    ascending = client.files.list(order="asc", purpose="batch").data
    assert [f.id for f in ascending] == sorted(f.id for f in ascending)
    newest_three = [f.id for f in client.files.list(purpose="batch", limit=3)]  # auto-paginates
    assert created[2].id in newest_three

    deleted = client.files.delete(created[0].id)
    assert deleted.deleted is True and deleted.id == created[0].id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created[0].id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(created[0].id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(created[0].id)
    assert created[0].id not in [f.id for f in client.files.list()]


def test_batch_list_paginates_newest_first(client: openai.OpenAI) -> None:
    file_id = upload(client, b'{"not valid\n')  # fails at once: cheap batches to list
    made = [
        client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for _ in range(4)
    ]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == made[::-1][:2]
    assert page.has_more
    following = client.batches.list(limit=2, after=page.data[-1].id)
    assert [b.id for b in following.data] == made[::-1][2:4]
    walked = []
    for batch in client.batches.list(limit=3):  # the SDK follows the cursor itself
        walked.append(batch.id)
        if len(walked) == 6:
            break
    assert walked[:4] == made[::-1]


def test_authentication_and_tenant_isolation(server: ServerProcess) -> None:
    response = httpx.get(f"{server.openai_base_url}/batches")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    wrong = openai.OpenAI(base_url=server.openai_base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.files.list()
    assert httpx.get(f"{server.url}/healthz").status_code == 200

    alice = openai.OpenAI(base_url=server.openai_base_url, api_key=API_KEY, max_retries=0)
    bob = openai.OpenAI(base_url=server.openai_base_url, api_key=OTHER_KEY, max_retries=0)
    file_id = upload(alice, [chat_line("a", "hi")])
    batch = alice.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    for call in (
        lambda: bob.files.retrieve(file_id),
        lambda: bob.files.content(file_id),
        lambda: bob.files.delete(file_id),
        lambda: bob.batches.retrieve(batch.id),
        lambda: bob.batches.cancel(batch.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError):  # bob cannot start a batch on alice's file
        bob.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert file_id not in [f.id for f in bob.files.list()]
    assert batch.id not in [b.id for b in bob.batches.list()]
    wait_for(alice, batch.id)


def test_ten_thousand_line_file_is_validated_and_cancelled(client: openai.OpenAI) -> None:
    lines = [chat_line(f"bulk-{i:05d}", f"Item {i}", max_tokens=4) for i in range(10_000)]
    batch = client.batches.create(
        input_file_id=upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    batch = wait_for(client, batch.id, ("in_progress", "failed", "completed"), timeout=120)
    assert batch.status == "in_progress"
    assert batch.request_counts.total == 10_000
    client.batches.cancel(batch.id)
    batch = wait_for(client, batch.id, timeout=120)
    assert batch.status == "cancelled"
    rows = read_jsonl(client, batch.output_file_id) + read_jsonl(client, batch.error_file_id)
    assert len(rows) == 10_000
    assert len({row["custom_id"] for row in rows}) == 10_000
