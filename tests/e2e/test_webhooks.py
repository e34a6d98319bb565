"""Webhooks end to end: endpoints managed with the official SDK (``client.webhooks``), batch
events delivered to a receiver on loopback and verified with the SDK's own ``unwrap``, a
receiver that fails once or hangs once (retried), addresses refused by default, and an event
that survives a kill -9 of the server between the batch ending and the delivery."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.webhooks import BatchCancelledWebhookEvent, BatchCompletedWebhookEvent

from tests.support.helpers import API_KEY, chat_line, create_message_batch, upload, wait_for
from tests.support.serverproc import ServerProcess, free_port, running_server

WEBHOOK_ENV = {
    "BATCHD_API_KEYS": API_KEY,
    "BATCHD_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
    "BATCHD_WEBHOOK_RETRY_BASE_SECONDS": "1",
    "BATCHD_WEBHOOK_TIMEOUT_SECONDS": "2",
}


class Receiver:
    """An HTTP server on loopback that records each request and answers from a script: a
    status code, or "hang" (answer only after the sender's timeout); 200 once it runs out."""

    def __init__(self, script: list[int | str] | None = None, port: int | None = None) -> None:
        self.script = list(script or [])
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.port = port or free_port()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                step = receiver.script.pop(0) if receiver.script else 200
                if step == "hang":
                    time.sleep(4)
                    step = 200
                self.send_response(int(step))
                self.end_headers()
                self.wfile.write(b"receiver says " + str(step).encode() + b" " + b"x" * 1000)

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait(self, count: int, timeout: float = 60) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            assert time.monotonic() < deadline, f"{len(self.received)} of {count} requests came"
            time.sleep(0.1)
        return self.received


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("webhooks"), **WEBHOOK_ENV) as srv:
        yield srv


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_base_url, api_key=API_KEY, max_retries=0)


def _run_batch(client: openai.OpenAI, n: int = 2) -> str:
    lines = [chat_line(f"r{i}", f"Say {i}.", max_tokens=4) for i in range(n)]
    batch = client.batches.create(
        input_file_id=upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    return batch.id


def test_endpoints_through_the_sdk_and_a_verified_batch_completed_event(
    server: ServerProcess,
) -> None:
    client = _client(server)
    with Receiver() as receiver:
        endpoint = client.webhooks.create(
            url=receiver.url, event_types=["batch.completed"], name="ci"
        )
        assert endpoint.id.startswith("we_")
        assert endpoint.signing_secret.startswith("whsec_")
        shown = client.webhooks.retrieve(endpoint.id)
        assert shown.url == receiver.url and shown.event_types == ["batch.completed"]
        assert "signing_secret" not in (shown.model_extra or {})  # shown at creation only
        assert endpoint.id in [e.id for e in client.webhooks.list()]

        batch_id = _run_batch(client)
        assert wait_for(client, batch_id).status == "completed"
        [(headers, body)] = receiver.wait(1)
        verifier = openai.OpenAI(api_key="unused", webhook_secret=endpoint.signing_secret)
        event = verifier.webhooks.unwrap(body, headers)
        assert isinstance(event, BatchCompletedWebhookEvent)
        assert event.data.id == batch_id
        assert headers["webhook-id"] == event.id
        with pytest.raises(openai.InvalidWebhookSignatureError):
            verifier.webhooks.unwrap(body.replace(b"batch_", b"batcX_"), headers)

        # A test event, sent there and then; the answer says what the receiver said.
        tested = client.webhooks.test(endpoint.id, event_type="batch.failed")
        assert tested.status_code == 200
        _, test_body = receiver.wait(2)[1]
        assert json.loads(test_body)["type"] == "batch.failed"

        deliveries = httpx.get(
            f"{server.openai_base_url}/webhook_endpoints/{endpoint.id}/deliveries",
            headers={"authorization": f"Bearer {API_KEY}"},
        ).json()["data"]
        assert {d["state"] for d in deliveries} == {"delivered"}
        assert {d["type"] for d in deliveries} == {"batch.completed", "batch.failed"}

        rotated = client.webhooks.rotate_secret(endpoint.id)
        assert rotated.signing_secret != endpoint.signing_secret
        updated = client.webhooks.update(endpoint.id, name="renamed")
        assert updated.name == "renamed"
        deleted = client.webhooks.delete(endpoint.id)
        assert deleted.deleted
        with pytest.raises(openai.NotFoundError):
            client.webhooks.retrieve(endpoint.id)


def test_a_receiver_failing_then_hanging_gets_the_event_again_until_it_answers(
    server: ServerProcess,
) -> None:
    client = _client(server)
    with Receiver(script=[500, "hang"]) as receiver:
        endpoint = client.webhooks.create(
            url=receiver.url, event_types=["batch.cancelled"], name="flaky"
        )
        batch_id = _run_batch(client, 30)
        client.batches.cancel(batch_id)
        assert wait_for(client, batch_id).status == "cancelled"
        received = receiver.wait(3, timeout=90)
        ids = {headers["webhook-id"] for headers, _ in received}
        assert len(ids) == 1  # the same event, three attempts
        verifier = openai.OpenAI(api_key="unused", webhook_secret=endpoint.signing_secret)
        event = verifier.webhooks.unwrap(received[-1][1], received[-1][0])
        assert isinstance(event, BatchCancelledWebhookEvent) and event.data.id == batch_id

        def delivery() -> dict[str, Any]:
            return httpx.get(  # type: ignore[no-any-return]
                f"{server.openai_base_url}/webhook_endpoints/{endpoint.id}/deliveries",
                headers={"authorization": f"Bearer {API_KEY}"},
            ).json()["data"][0]

        deadline = time.monotonic() + 30
        while delivery()["state"] != "delivered":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        final = delivery()
        assert final["attempts"] == 3 and final["last_status"] == 200
        client.webhooks.delete(endpoint.id)


def test_an_anthropic_batch_sends_message_batch_ended(server: ServerProcess) -> None:
    client = _client(server)
    with Receiver() as receiver:
        endpoint = client.webhooks.create(
            url=receiver.url, event_types=["message_batch.ended"], name="anthropic"
        )
        batch_id = create_message_batch(server.url)
        [(headers, body)] = receiver.wait(1, timeout=120)
        verifier = openai.OpenAI(api_key="unused", webhook_secret=endpoint.signing_secret)
        verifier.webhooks.verify_signature(body, headers)  # raises if it does not match
        event = json.loads(body)
        assert event["type"] == "message_batch.ended" and event["data"]["id"] == batch_id
        client.webhooks.delete(endpoint.id)


def test_unsafe_urls_are_refused_and_a_name_resolving_to_loopback_is_not_called(
    server: ServerProcess,
) -> None:
    client = _client(server)
    for url in ("http://example.com/hook", "https://10.1.2.3/hook", "https://[::1]/hook"):
        with pytest.raises(openai.BadRequestError) as refused:
            client.webhooks.create(url=url, event_types=["batch.completed"], name="x")
        assert refused.value.body["param"] == "url"  # type: ignore[index]
    with Receiver() as receiver:
        # "localhost" is not an allowed host: it may be created (a name), but it resolves to
        # loopback, so no request is ever made to it.
        sneaky = client.webhooks.create(
            url=f"https://localhost:{receiver.port}/hook", event_types=["batch.completed"], name="s"
        )
        result = client.webhooks.test(sneaky.id, event_type="batch.completed")
        assert result.status_code == 0
        assert receiver.received == []
        deliveries = httpx.get(
            f"{server.openai_base_url}/webhook_endpoints/{sneaky.id}/deliveries",
            headers={"authorization": f"Bearer {API_KEY}"},
        ).json()["data"]
        assert "not public" in deliveries[0]["last_error"]
        client.webhooks.delete(sneaky.id)


@pytest.mark.slow
def test_an_event_survives_a_kill9_between_the_batch_ending_and_its_delivery(
    tmp_path: Path,
) -> None:
    port = free_port()  # the receiver is down while the batch ends
    server = ServerProcess(data_dir=tmp_path / "data", env=WEBHOOK_ENV).start()
    try:
        client = _client(server)
        endpoint = client.webhooks.create(
            url=f"http://127.0.0.1:{port}/hook", event_types=["batch.completed"], name="k"
        )
        batch_id = _run_batch(client)
        assert wait_for(client, batch_id).status == "completed"
        server.kill9()
        with Receiver(port=port) as receiver:
            server = ServerProcess(data_dir=tmp_path / "data", env=WEBHOOK_ENV, port=server.port)
            server.start()
            # The dead sender's lease runs out (30 s), then the new process sends.
            received = receiver.wait(1, timeout=120)
            verifier = openai.OpenAI(api_key="unused", webhook_secret=endpoint.signing_secret)
            event = verifier.webhooks.unwrap(received[0][1], received[0][0])
            assert isinstance(event, BatchCompletedWebhookEvent) and event.data.id == batch_id
    finally:
        server.stop()
