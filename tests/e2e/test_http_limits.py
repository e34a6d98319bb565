"""The request head's limits, over raw sockets (no HTTP client sends such heads): a head over
BATCHD_MAX_HEADER_BYTES or with more than BATCHD_MAX_HEADERS headers is refused with a 431 in
the surface's error shape (or the connection closed) as it arrives, and nobody else notices."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import openai

from tests.support.helpers import API_KEY
from tests.support.serverproc import ServerProcess

REFUSED_WITHIN_SECONDS = 5


def send_head(server: ServerProcess, head: bytes) -> tuple[bytes, float]:
    """Send ``head`` and read until the server closes; the reply (empty if the connection
    was reset before it could be read) and how long it took."""
    started = time.monotonic()
    reply = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        # Refused while we were still sending: the reply may be readable yet.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head)
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    return reply, time.monotonic() - started


def refused(reply: bytes) -> dict[str, object] | None:
    """The 431's JSON body, or None if the connection was closed without one."""
    if not reply:
        return None
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), reply[:300]
    assert b"connection: close" in head.lower()
    return dict(json.loads(body))


def head(path: str, *headers: bytes) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1".encode(),
        b"Host: x",
        f"Authorization: Bearer {API_KEY}".encode(),
    ]
    return b"\r\n".join([*lines, *headers]) + b"\r\n\r\n"


def test_a_one_mib_header_is_refused_quickly(server: ServerProcess) -> None:
    reply, took = send_head(server, head("/v1/batches", b"X-Big: " + b"a" * (1 << 20)))
    assert took < REFUSED_WITHIN_SECONDS
    body = refused(reply)
    if body is not None:  # OpenAI's shape, naming the limit
        error = body["error"]
        assert isinstance(error, dict) and error["code"] == "request_header_fields_too_large"
        assert "65536 bytes" in error["message"] and "max_header_bytes" in error["message"]


def test_ten_thousand_headers_are_refused_in_anthropic_shape(server: ServerProcess) -> None:
    many = [b"X-H%d: v" % i for i in range(10_000)]
    reply, took = send_head(server, head("/v1/messages/batches", *many))
    assert took < REFUSED_WITHIN_SECONDS
    body = refused(reply)
    if body is not None:
        assert body["type"] == "error"
        error = body["error"]
        assert isinstance(error, dict) and error["type"] == "invalid_request_error"
        assert "100 headers" in error["message"] and "max_headers" in error["message"]
        # Anthropic's request-id header, and x-request-id, name the body's request_id.
        lines = reply.partition(b"\r\n\r\n")[0].lower().split(b"\r\n")
        request_id = str(body["request_id"]).encode()
        assert b"request-id: " + request_id in lines and b"x-request-id: " + request_id in lines


def test_a_one_mib_request_line_is_refused(server: ServerProcess) -> None:
    reply, took = send_head(server, head("/v1/batches?x=" + "a" * (1 << 20)))
    assert took < REFUSED_WITHIN_SECONDS
    body = refused(reply)
    assert body is None or "request line" in str(body["error"])


def test_heads_within_the_limits_are_served(server: ServerProcess) -> None:
    near_limit = b"X-Big: " + b"a" * 60_000
    some = [b"X-H%d: v" % i for i in range(90)]
    for request in (head("/v1/batches", near_limit), head("/v1/batches", *some)):
        reply, _ = send_head(server, request.replace(b"Host: x", b"Host: x\r\nConnection: close"))
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]


def test_other_clients_are_unaffected(server: ServerProcess) -> None:
    """Hostile heads arrive from several connections while an SDK client works: each of its
    calls is answered, and the server still serves after."""
    stop = threading.Event()

    def hostile() -> None:
        while not stop.is_set():
            send_head(server, head("/v1/batches", b"X-Big: " + b"a" * (1 << 20)))
            send_head(server, head("/v1/batches", *[b"X-H%d: v" % i for i in range(10_000)]))

    attackers = [threading.Thread(target=hostile) for _ in range(4)]
    for thread in attackers:
        thread.start()
    try:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key=API_KEY, max_retries=0)
        for _ in range(20):
            assert client.batches.list(limit=1).data is not None
    finally:
        stop.set()
        for thread in attackers:
            thread.join(timeout=30)
    assert client.files.list().data is not None
