"""Idempotency-Key on every create, through the official SDKs: a retried create returns the
first object, a reused key with another request is a 409 in the surface's shape, and keys
belong to their tenant."""

from __future__ import annotations

import uuid

import anthropic
import openai
import pytest

from tests.support.helpers import API_KEY, OTHER_KEY, chat_line, jsonl
from tests.support.serverproc import ServerProcess


def fresh_key() -> dict[str, str]:
    return {"Idempotency-Key": f"test-{uuid.uuid4()}"}


def test_file_upload_and_batch_create_happen_once_per_key(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    data = jsonl([chat_line("a", "Hi", max_tokens=1)])
    key = fresh_key()
    first = client.files.create(file=("in.jsonl", data), purpose="batch", extra_headers=key)
    again = client.files.create(file=("in.jsonl", data), purpose="batch", extra_headers=key)
    assert again.id == first.id
    listed = [f.id for f in client.files.list() if f.filename == "in.jsonl"]
    assert listed.count(first.id) == 1
    assert client.files.content(first.id).content == data  # the first copy is intact

    with pytest.raises(openai.ConflictError) as excinfo:  # same key, other bytes
        client.files.create(file=("in.jsonl", data + data), purpose="batch", extra_headers=key)
    assert excinfo.value.status_code == 409
    assert excinfo.value.body["param"] == "Idempotency-Key"  # type: ignore[index]
    assert "different request" in excinfo.value.message

    key = fresh_key()
    args = {
        "input_file_id": first.id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    made = client.batches.create(**args, extra_headers=key)  # type: ignore[call-overload]
    repeat = client.batches.create(**args, extra_headers=key)  # type: ignore[call-overload]
    assert repeat.id == made.id
    with pytest.raises(openai.ConflictError):
        client.batches.create(**args, metadata={"run": "2"}, extra_headers=key)  # type: ignore[call-overload]
    plain = client.batches.create(**args)  # type: ignore[call-overload]
    assert plain.id != made.id  # no key: a new batch every time

    # Another tenant using the same key string gets its own object.
    other = openai.OpenAI(base_url=server.openai_base_url, api_key=OTHER_KEY, max_retries=0)
    theirs = other.files.create(file=("in.jsonl", data), purpose="batch", extra_headers=key)
    assert theirs.id != first.id


def test_message_batch_create_happens_once_per_key(server: ServerProcess) -> None:
    claude = anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0)
    requests = [
        {
            "custom_id": "only",
            "params": {
                "model": "default",
                "max_tokens": 1,
                "messages": [{"role": "user", "content": "Hi"}],
            },
        }
    ]
    key = fresh_key()
    made = claude.messages.batches.create(requests=requests, extra_headers=key)  # type: ignore[arg-type]
    again = claude.messages.batches.create(requests=requests, extra_headers=key)  # type: ignore[arg-type]
    assert again.id == made.id
    requests[0]["custom_id"] = "changed"
    with pytest.raises(anthropic.ConflictError) as excinfo:
        claude.messages.batches.create(requests=requests, extra_headers=key)  # type: ignore[arg-type]
    body = excinfo.value.body
    assert body["type"] == "error" and "Idempotency-Key" in body["error"]["message"]  # type: ignore[index]


def test_a_malformed_key_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.batches.create(
            input_file_id="file-x",
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_headers={"Idempotency-Key": "x" * 300},
        )
    assert excinfo.value.body["param"] == "Idempotency-Key"  # type: ignore[index]
