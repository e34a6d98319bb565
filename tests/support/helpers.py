"""What the tests share that is not a fixture: the suite's API keys, batch-line builders, and
helpers that upload, wait for and read batches through the official SDKs."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.support.serverproc import ServerProcess, running_server

API_KEY = "test-key-alpha"
OTHER_KEY = "test-key-beta"
TERMINAL = ("completed", "failed", "expired", "cancelled")


@contextlib.contextmanager
def keyed_server(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[ServerProcess]:
    """A server of a module's own, with this suite's two keys: for tests that count or compare
    and must not see another test's work."""
    with running_server(
        tmp_path_factory.mktemp(name), BATCHD_API_KEYS=f"{API_KEY},{OTHER_KEY}"
    ) as srv:
        yield srv


def chat_line(
    custom_id: str, content: str, *, max_tokens: int = 8, model: str = "default", **body: Any
) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
            **body,
        },
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return ("\n".join(json.dumps(line) for line in lines) + "\n").encode()


def upload(
    client: openai.OpenAI, lines: list[dict[str, Any]] | bytes, name: str = "input.jsonl"
) -> str:
    data = lines if isinstance(lines, bytes) else jsonl(lines)
    return client.files.create(file=(name, data), purpose="batch").id


def wait_for(
    client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...] = TERMINAL, timeout: float = 300
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout}s")
        time.sleep(0.3)


def read_jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    text = client.files.content(file_id).text
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def create_message_batch(url: str, custom_id: str = "m0", *, key: str = API_KEY) -> str:
    """A one-request Anthropic message batch (max_tokens 2) over plain HTTP; its id."""
    created = httpx.post(
        f"{url}/v1/messages/batches",
        headers={"authorization": f"Bearer {key}"},
        json={
            "requests": [
                {
                    "custom_id": custom_id,
                    "params": {
                        "model": "default",
                        "max_tokens": 2,
                        "messages": [{"role": "user", "content": "Hi."}],
                    },
                }
            ]
        },
        timeout=30,
    )
    assert created.status_code == 200, created.text
    return str(created.json()["id"])


def eventually(predicate: Callable[[], bool], what: str, timeout: float = 120) -> None:
    """Until ``predicate()`` holds; fails naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not reached in {timeout}s: {what}"
        time.sleep(0.2)


def file_gone(client: openai.OpenAI, file_id: str) -> bool:
    try:
        client.files.retrieve(file_id)
    except openai.NotFoundError:
        return True
    return False


# The Responses API stream's events in the order the openai SDK expects them.
RESPONSES_STREAM_OPENING = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
RESPONSES_STREAM_CLOSING = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


def assert_responses_stream_order(types: list[str]) -> None:
    """The four opening events, text deltas only, the three closing events, then
    ``response.completed`` or ``response.incomplete``."""
    assert types[:4] == RESPONSES_STREAM_OPENING
    assert set(types[4:-4]) <= {"response.output_text.delta"}
    assert types[-4:-1] == RESPONSES_STREAM_CLOSING
    assert types[-1] in ("response.completed", "response.incomplete")
