"""The polling fast path (api/poll_fast_path.py) answers GET /v1/batches[/{id}] and
/v1/messages/batches[/{id}] ahead of the FastAPI app. It must answer exactly as the full path
would: the same status, body and headers, the same refusals, the same scoping by tenant.

Each request is sent twice: once as the fast path takes it, and once spelled so that the fast
path steps aside and FastAPI answers (a ``limit`` with a leading zero, which FastAPI reads
as the same number; an unknown query parameter on a retrieve, which FastAPI ignores)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.support.helpers import (
    API_KEY,
    OTHER_KEY,
    chat_line,
    create_message_batch,
    keyed_server,
    upload,
    wait_for,
)
from tests.support.serverproc import ServerProcess

BEARER = {"authorization": f"Bearer {API_KEY}"}
# Headers that differ between any two responses: the clock and the fresh request id (sent
# twice on the Anthropic surface, as x-request-id and request-id).
VOLATILE = {"date", "x-request-id", "request-id"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of this module's own: no other test's batch may change state between the two
    requests of a pair (a list shows every batch of the tenant)."""
    with keyed_server(tmp_path_factory, "batchd-fast-path") as srv:
        yield srv


def _wait_ended(http: httpx.Client, message_batch_id: str) -> None:
    deadline = time.monotonic() + 300
    while http.get(f"/v1/messages/batches/{message_batch_id}").json()["processing_status"] != (
        "ended"
    ):
        assert time.monotonic() < deadline, "the message batch did not end"
        time.sleep(0.3)


def _body(response: httpx.Response) -> bytes:
    """The body, with the response's own request id (Anthropic's errors carry it) masked."""
    return response.content.replace(response.headers["x-request-id"].encode(), b"req_*")


def _same(fast: httpx.Response, full: httpx.Response) -> None:
    assert fast.status_code == full.status_code, (fast.text, full.text)
    assert _body(fast) == _body(full)
    strip = lambda r: [(k, v) for k, v in r.headers.multi_items() if k not in VOLATILE]  # noqa: E731
    assert strip(fast) == strip(full)
    assert fast.headers["x-request-id"].startswith("req_")
    assert full.headers["x-request-id"].startswith("req_")
    for response in (fast, full):
        anthropic = response.url.path.startswith("/v1/messages")
        expected = response.headers["x-request-id"] if anthropic else None
        assert response.headers.get("request-id") == expected


def test_the_fast_path_answers_byte_for_byte_as_the_full_path(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    file_id = upload(client, [chat_line("p0", "Say hi.", max_tokens=2)])
    batch = client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"case": "fast-path"},
    )
    wait_for(client, batch.id)
    message_batch_id = create_message_batch(server.url, "m0")

    with httpx.Client(base_url=server.url, headers=BEARER, timeout=30) as http:
        _wait_ended(http, message_batch_id)  # nothing changes between a pair's two requests
        pairs = [
            (f"/v1/batches/{batch.id}", f"/v1/batches/{batch.id}?unused=1"),
            ("/v1/batches", "/v1/batches?limit=020"),
            ("/v1/batches?limit=1", "/v1/batches?limit=01"),
            (f"/v1/batches?after={batch.id}&limit=5", f"/v1/batches?after={batch.id}&limit=05"),
            ("/v1/messages/batches", "/v1/messages/batches?limit=020"),
            (
                f"/v1/messages/batches/{message_batch_id}",
                f"/v1/messages/batches/{message_batch_id}?unused=1",
            ),
            # Unknown and malformed ids: the 404 in each surface's shape.
            ("/v1/batches/batch_nope", "/v1/batches/batch_nope?unused=1"),
            ("/v1/batches/..%2F..%2Fetc", "/v1/batches/..%2F..%2Fetc?unused=1"),
            ("/v1/messages/batches/msgbatch_nope", "/v1/messages/batches/msgbatch_nope?unused=1"),
        ]
        for fast_path, full_path in pairs:
            _same(http.get(fast_path), http.get(full_path))
        # Anthropic's error body quotes the response's own request id.
        missing = http.get("/v1/messages/batches/msgbatch_nope")
        assert missing.json()["request_id"] == missing.headers["x-request-id"]
        # x-api-key (Anthropic's header) is the same key.
        anthropic = {"x-api-key": API_KEY}
        _same(
            http.get("/v1/messages/batches", headers={**anthropic, "authorization": ""}),
            http.get("/v1/messages/batches?limit=020", headers={**anthropic, "authorization": ""}),
        )


def test_the_fast_path_refuses_and_scopes_like_the_full_path(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    file_id = upload(client, [chat_line("p0", "Say hi.", max_tokens=2)])
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    with httpx.Client(base_url=server.url, timeout=30) as http:
        path = f"/v1/batches/{batch.id}"
        refusals = [
            {},  # no key
            {"authorization": "Bearer not-a-key"},
            {"x-api-key": "not-a-key"},
            {"authorization": f"Bearer {API_KEY}", "x-api-key": OTHER_KEY},  # two keys
        ]
        for headers in refusals:
            fast, full = (
                http.get(path, headers=headers),
                http.get(f"{path}?unused=1", headers=headers),
            )
            assert fast.status_code == 401
            _same(fast, full)
            assert batch.id not in fast.text
        # Another tenant's key: the batch is unknown to it, byte for byte as an unknown id.
        other = {"authorization": f"Bearer {OTHER_KEY}"}
        foreign = http.get(path, headers=other)
        unknown = http.get("/v1/batches/batch_" + "0" * len(batch.id[6:]), headers=other)
        assert foreign.status_code == unknown.status_code == 404
        assert foreign.json()["error"]["code"] == unknown.json()["error"]["code"]
        listed = http.get("/v1/batches?limit=100", headers=other).json()["data"]
        assert batch.id not in [b["id"] for b in listed]
    wait_for(client, batch.id)
