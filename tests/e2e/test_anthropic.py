"""The Anthropic surface (Message Batches and Messages), driven by the official anthropic SDK
against a real server running the real engine on the bundled model."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from batchd.engines.llamacpp.model_files import BUNDLED_MODEL_ID
from tests.support.helpers import API_KEY, OTHER_KEY
from tests.support.serverproc import ServerProcess

BATCH_KEYS = {
    "id", "type", "processing_status", "request_counts", "ended_at", "created_at", "expires_at",
    "archived_at", "cancel_initiated_at", "results_url",
}  # fmt: skip
EXTENSION_KEYS = {"batchd"}  # ours: usage, cost and saving (docs/console.md); SDKs keep it
RFC3339_MICROS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
# This SDK generation dropped the sampling arguments from ``messages.create``; they still go
# on the wire, which is what users of older code send.
GREEDY = {"temperature": 0}


@pytest.fixture()
def claude(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0)


@pytest.fixture()
def other(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=OTHER_KEY, max_retries=0)


def ask(custom_id: str, content: Any, *, max_tokens: int = 8, **params: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "params": {
            "model": "default",
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            **params,
        },
    }


def wait_ended(client: anthropic.Anthropic, batch_id: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended":
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"{batch_id} still {batch.processing_status} after {timeout}s")
        time.sleep(0.2)


def raw(server: ServerProcess, method: str, path: str, key: str = API_KEY, **kw: Any) -> Any:
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01", **kw.pop("headers", {})}
    return httpx.request(method, server.url + path, headers=headers, timeout=60, **kw)


def read_response(sock: socket.socket) -> str:
    """One whole HTTP response (headers and a Content-Length body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"\r\n\r\n"
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def assert_error(body: Any, error_type: str) -> str:
    assert body["type"] == "error", body
    assert body["error"]["type"] == error_type, body
    assert body["request_id"].startswith("req_")
    return str(body["error"]["message"])


def test_batch_ends_with_exact_counts_and_real_text(
    claude: anthropic.Anthropic, server: ServerProcess
) -> None:
    good = [
        ask("plain", "What is the capital of France?", system="Answer in one short sentence."),
        {
            "custom_id": "merged-turns",
            "params": {
                "model": "smollm2-135m-instruct",
                "max_tokens": 6,
                "system": [
                    {
                        "type": "text",
                        "text": "You are terse.",
                        "cache_control": {"type": "ephemeral"},
                    }
                ],
                "messages": [
                    {"role": "user", "content": "Name a colour."},
                    {"role": "user", "content": [{"type": "text", "text": "Just one word."}]},
                ],
                "top_k": 20,
                "top_p": 0.9,
                "temperature": 0.5,
                "metadata": {"user_id": "u-1"},
            },
        },
        {
            "custom_id": "prefill",
            "params": {
                "model": "default",
                "max_tokens": 8,
                "messages": [
                    {"role": "user", "content": "Count from one to five."},
                    {"role": "assistant", "content": "One, two,"},
                ],
            },
        },
        ask("with-stops", "Say hello.", stop_sequences=["zzzz-never"]),
    ]
    bad = [
        ask("unknown-model", "Hi", model="no-such-model"),
        ask("tools", "Hi", tools=[{"name": "t", "input_schema": {"type": "object"}}]),
        ask("image", [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]),
        ask("streaming", "Hi", stream=True),
    ]  # fmt: skip
    requests = [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3], bad[3]]
    created = claude.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    assert created.id.startswith("msgbatch_")
    assert created.type == "message_batch"
    assert created.processing_status == "in_progress"
    assert created.request_counts.processing == 8
    assert created.results_url is None and created.ended_at is None
    assert (created.expires_at - created.created_at).total_seconds() == 24 * 3600

    batch = wait_ended(claude, created.id)
    counts = batch.request_counts
    assert (counts.processing, counts.succeeded, counts.errored) == (0, 4, 4)
    assert (counts.canceled, counts.expired) == (0, 0)
    assert batch.ended_at is not None and batch.cancel_initiated_at is None
    assert batch.results_url == f"{server.url}/v1/messages/batches/{batch.id}/results"

    body = raw(server, "GET", f"/v1/messages/batches/{batch.id}").json()
    assert set(body) == BATCH_KEYS | EXTENSION_KEYS
    assert body["archived_at"] is None and body["cancel_initiated_at"] is None
    for key in ("created_at", "expires_at", "ended_at"):
        assert RFC3339_MICROS.match(body[key]), body[key]

    results = list(claude.messages.batches.results(batch.id))
    assert [r.custom_id for r in results] == [r["custom_id"] for r in requests]
    by_id = {r.custom_id: r.result for r in results}
    for request in good:
        result = by_id[request["custom_id"]]
        assert result.type == "succeeded", result
        message = result.message
        assert message.id.startswith("msg_") and message.type == "message"
        assert message.role == "assistant"
        assert message.model == BUNDLED_MODEL_ID  # the served model, not the alias asked for
        assert message.content and message.content[0].type == "text"
        assert message.content[0].text.strip()
        assert message.stop_reason in ("end_turn", "max_tokens")
        assert message.stop_sequence is None
        usage = message.usage
        assert 1 <= usage.output_tokens <= request["params"]["max_tokens"]
        assert usage.input_tokens >= 1 and usage.cache_read_input_tokens == 0
        # Cache writes only for a prefix marked with cache_control (merged-turns marks its
        # system prompt, which no other request shares); no reads, whatever the engine shared.
        if request["custom_id"] == "merged-turns":
            assert usage.cache_creation_input_tokens > 0
        else:
            assert usage.cache_creation_input_tokens == 0
        assert usage.cache_creation is not None
        assert usage.cache_creation.ephemeral_5m_input_tokens == usage.cache_creation_input_tokens
        assert usage.service_tier == "batch"

    expected = {
        "unknown-model": ("not_found_error", "no-such-model"),
        "tools": ("invalid_request_error", "tools"),
        "image": ("invalid_request_error", "messages.0.content.0"),
        "streaming": ("invalid_request_error", "stream"),
    }
    for custom_id, (error_type, named) in expected.items():
        result = by_id[custom_id]
        assert result.type == "errored", result
        assert result.error.type == "error"
        assert result.error.error.type == error_type
        assert named in result.error.error.message

    # The wire lines themselves: exactly Anthropic's keys, in input order.
    lines = raw(server, "GET", f"/v1/messages/batches/{batch.id}/results").text.splitlines()
    assert len(lines) == 8
    first = json.loads(lines[0])
    assert set(first) == {"custom_id", "result"}
    assert set(first["result"]) == {"type", "message"}
    assert set(first["result"]["message"]) == {
        "id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"
    }  # fmt: skip
    assert json.loads(lines[1])["result"]["error"]["request_id"] is None


def test_list_pagination_in_both_directions(claude: anthropic.Anthropic) -> None:
    made = [
        claude.messages.batches.create(requests=[ask(f"p{i}", "Hi", max_tokens=1)]).id  # type: ignore[list-item]
        for i in range(3)
    ]
    newest_first = list(reversed(made))

    # Forward (after_id): the auto-pager walks from newest to oldest, one item per page.
    forward = [b.id for b in claude.messages.batches.list(limit=1)]
    assert forward[:3] == newest_first
    assert len(forward) == len(set(forward))
    page = claude.messages.batches.list(limit=2)
    assert [b.id for b in page.data] == newest_first[:2]
    assert page.has_more and page.first_id == made[2] and page.last_id == made[1]

    # Backward (before_id): pages of newer batches, each still newest first.
    page = claude.messages.batches.list(before_id=made[0], limit=1)
    assert [b.id for b in page.data] == [made[1]] and page.has_more
    backward = [b.id for b in claude.messages.batches.list(before_id=made[0], limit=1)]
    assert backward == [made[1], made[2]]
    page = claude.messages.batches.list(before_id=made[0], limit=5)
    assert [b.id for b in page.data] == [made[2], made[1]] and not page.has_more

    with pytest.raises(anthropic.BadRequestError) as excinfo:
        claude.messages.batches.list(limit=1001)
    assert_error(excinfo.value.body, "invalid_request_error")


def test_cancel_mid_run_keeps_finished_results(claude: anthropic.Anthropic) -> None:
    # Two quick requests lead (rows are leased in input order), thirty long ones follow: the
    # cancel lands after the quick ones succeeded and long before the long ones could finish.
    requests = [ask(f"quick-{i}", "Say yes.", max_tokens=2) for i in range(2)]
    requests += [ask(f"story-{i}", f"Write a long story about day {i}.", max_tokens=64) for i in range(30)]  # fmt: skip
    batch = claude.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    deadline = time.monotonic() + 120
    while batch.request_counts.succeeded == 0:
        assert batch.processing_status == "in_progress", batch  # live counts move before the end
        assert time.monotonic() < deadline, "nothing finished"
        time.sleep(0.05)
        batch = claude.messages.batches.retrieve(batch.id)

    cancelled = claude.messages.batches.cancel(batch.id)
    assert cancelled.processing_status in ("canceling", "ended")
    assert cancelled.cancel_initiated_at is not None

    batch = wait_ended(claude, batch.id)
    counts = batch.request_counts
    assert counts.processing == 0 and counts.errored == 0 and counts.expired == 0
    assert counts.succeeded >= 1 and counts.canceled >= 1
    assert counts.succeeded + counts.canceled == 32
    assert batch.cancel_initiated_at is not None and batch.ended_at is not None

    results = list(claude.messages.batches.results(batch.id))
    kinds = [r.result.type for r in results]
    assert kinds.count("succeeded") == counts.succeeded
    assert kinds.count("canceled") == counts.canceled
    assert sorted(r.custom_id for r in results) == sorted(r["custom_id"] for r in requests)
    for result in results:
        if result.result.type == "succeeded":
            assert result.result.message.content[0].text

    with pytest.raises(anthropic.BadRequestError) as excinfo:
        claude.messages.batches.cancel(batch.id)
    assert "ended" in assert_error(excinfo.value.body, "invalid_request_error")


def test_delete_only_once_ended_and_results_only_once_ended(
    claude: anthropic.Anthropic, server: ServerProcess
) -> None:
    requests = [ask(f"d{i}", "Tell me a long tale.", max_tokens=64) for i in range(8)]
    batch = claude.messages.batches.create(requests=requests)  # type: ignore[arg-type]

    with pytest.raises(anthropic.BadRequestError) as excinfo:
        claude.messages.batches.delete(batch.id)
    assert "Cancel it first" in assert_error(excinfo.value.body, "invalid_request_error")
    early = raw(server, "GET", f"/v1/messages/batches/{batch.id}/results")
    assert early.status_code == 400
    assert_error(early.json(), "invalid_request_error")

    claude.messages.batches.cancel(batch.id)
    wait_ended(claude, batch.id)
    deleted = claude.messages.batches.delete(batch.id)
    assert (deleted.id, deleted.type) == (batch.id, "message_batch_deleted")

    with pytest.raises(anthropic.NotFoundError):
        claude.messages.batches.retrieve(batch.id)
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.batches.delete(batch.id)
    gone = raw(server, "GET", f"/v1/messages/batches/{batch.id}/results")
    assert gone.status_code == 404
    assert_error(gone.json(), "not_found_error")
    assert batch.id not in [b.id for b in claude.messages.batches.list(limit=1000).data]


@pytest.mark.parametrize(
    ("requests", "named"),
    [
        ([ask("same", "a"), ask("other", "b"), ask("same", "c")], "requests.2.custom_id"),
        ([ask("has space", "a")], "requests.0.custom_id"),
        ([ask("x" * 65, "a")], "requests.0.custom_id"),
        ([ask("", "a")], "requests.0.custom_id"),
        ([ask("ok", "a"), {"custom_id": "p", "params": "not an object"}], "requests.1.params"),
        ([{"custom_id": "no-params"}], "requests.0.params"),
        ([], "requests"),
    ],
)
def test_create_validation_errors(
    claude: anthropic.Anthropic, requests: list[Any], named: str
) -> None:
    before = [b.id for b in claude.messages.batches.list(limit=5).data]
    with pytest.raises(anthropic.BadRequestError) as excinfo:
        claude.messages.batches.create(requests=requests)
    assert excinfo.value.status_code == 400
    message = assert_error(excinfo.value.body, "invalid_request_error")
    assert message.startswith(named + ":"), message
    assert [b.id for b in claude.messages.batches.list(limit=5).data] == before  # nothing made


def test_oversize_bodies_are_413(server: ServerProcess) -> None:
    # A declared length over the limit is refused before any of the body is read.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/messages/batches HTTP/1.1\r\nHost: x\r\n"
            + f"x-api-key: {API_KEY}\r\ncontent-type: application/json\r\n".encode()
            + f"content-length: {300 * 1024 * 1024}\r\n\r\n".encode()
            + b'{"requests": ['
        )
        head = read_response(sock)
    assert head.startswith("HTTP/1.1 413"), head
    body = json.loads(head.split("\r\n\r\n", 1)[1])
    assert "bytes" in assert_error(body, "request_too_large")

    # A chunked body (no length given) is counted while it streams in, and cut off.
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "default", "max_tokens": 1, "messages": [{"role": "user", "content": "'
        for _ in range(34):
            yield b"a" * (1024 * 1024)
        yield b'"}]}'

    response = raw(server, "POST", "/v1/messages", content=chunks())
    assert response.status_code == 413
    assert_error(response.json(), "request_too_large")


def test_realtime_messages_plain_and_streamed(
    claude: anthropic.Anthropic, server: ServerProcess
) -> None:
    messages = [{"role": "user", "content": "Tell me about the weather."}]
    whole = claude.messages.create(
        model="default", max_tokens=8, messages=messages, extra_body=GREEDY
    )
    assert whole.id.startswith("msg_") and whole.model == BUNDLED_MODEL_ID
    text = whole.content[0].text  # type: ignore[union-attr]
    assert text and whole.stop_reason in ("end_turn", "max_tokens")
    assert 1 <= whole.usage.output_tokens <= 8 and whole.usage.service_tier == "standard"

    with claude.messages.stream(
        model="default", max_tokens=8, messages=messages, extra_body=GREEDY
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens

    # The wire event sequence (the SDK hides the ping).
    with httpx.stream(
        "POST",
        f"{server.url}/v1/messages",
        headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"},
        json={"model": "default", "max_tokens": 8, "messages": messages, "stream": True},
        timeout=60,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[7:] for line in response.iter_lines() if line.startswith("event: ")]
    assert events[:3] == ["message_start", "content_block_start", "ping"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(events[3:-3]) == {"content_block_delta"}

    # A stop sequence taken from the greedy reply itself must end the same reply early.
    stop = text[len(text) // 2 :][:3]
    stopped = claude.messages.create(
        model="default",
        max_tokens=8,
        messages=messages,
        stop_sequences=[stop],
        extra_body=GREEDY,
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert "".join(b.text for b in stopped.content) == text[: text.find(stop)]  # type: ignore[union-attr]

    with pytest.raises(anthropic.NotFoundError) as excinfo:
        claude.messages.create(model="nope", max_tokens=4, messages=messages)
    assert_error(excinfo.value.body, "not_found_error")
    with pytest.raises(anthropic.BadRequestError) as excinfo:
        claude.messages.create(model="default", max_tokens=0, messages=messages)
    assert assert_error(excinfo.value.body, "invalid_request_error").startswith("max_tokens:")
    with pytest.raises(anthropic.BadRequestError) as excinfo:
        claude.messages.create(
            model="default", max_tokens=4, messages=messages, thinking={"type": "enabled", "budget_tokens": 1024}
        )  # fmt: skip
    assert "thinking" in assert_error(excinfo.value.body, "invalid_request_error")


def test_tenants_are_isolated(
    claude: anthropic.Anthropic, other: anthropic.Anthropic, server: ServerProcess
) -> None:
    mine = claude.messages.batches.create(requests=[ask("mine", "Hi", max_tokens=1)])  # type: ignore[list-item]
    wait_ended(claude, mine.id)
    unknown = "msgbatch_0000000000000000000000000"

    def answers(batch_id: str) -> list[tuple[int, str, str]]:
        out = []
        for method, path in (
            ("GET", f"/v1/messages/batches/{batch_id}"),
            ("POST", f"/v1/messages/batches/{batch_id}/cancel"),
            ("DELETE", f"/v1/messages/batches/{batch_id}"),
            ("GET", f"/v1/messages/batches/{batch_id}/results"),
        ):
            response = raw(server, method, path, key=OTHER_KEY)
            body = response.json()
            message = assert_error(body, body["error"]["type"])
            out.append(
                (response.status_code, body["error"]["type"], message.replace(batch_id, "ID"))
            )
        return out  # fmt: skip

    foreign = answers(mine.id)
    assert foreign == answers(unknown)
    assert {status for status, _, _ in foreign} == {404}
    with pytest.raises(anthropic.NotFoundError):
        other.messages.batches.retrieve(mine.id)
    assert mine.id not in [b.id for b in other.messages.batches.list(limit=1000).data]
    assert claude.messages.batches.retrieve(mine.id).processing_status == "ended"  # untouched

    response = raw(server, "GET", "/v1/messages/batches", key="wrong-key")
    assert response.status_code == 401
    assert_error(response.json(), "authentication_error")
