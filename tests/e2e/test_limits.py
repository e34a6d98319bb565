"""Configured limits over real HTTP: each refusal in its surface's wire shape, naming the
field or line, the limit and the actual value; and per-tenant admission that holds when
creates race each other (one SQLite server, and two API replicas on one PostgreSQL)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.support.helpers import chat_line, jsonl, upload, wait_for
from tests.support.serverproc import ServerProcess, free_port, running_server, stop_process

KEY, QUEUE_KEY = "limits-key-0001", "limits-queue-01"
MAX_UPLOAD_BYTES = 4096
MAX_LINE_BYTES = 1000
MAX_JSON_DEPTH = 8
MAX_BATCH_LINES = 6
MAX_QUEUED = 5
ANTHROPIC_MAX_REQUESTS = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(
        tmp_path_factory.mktemp("limits"),
        BATCHD_API_KEYS=f"{KEY},{QUEUE_KEY}",
        BATCHD_MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES),
        BATCHD_MAX_LINE_BYTES=str(MAX_LINE_BYTES),
        BATCHD_MAX_JSON_DEPTH=str(MAX_JSON_DEPTH),
        BATCHD_MAX_BATCH_LINES=str(MAX_BATCH_LINES),
        BATCHD_MAX_QUEUED_REQUESTS_PER_TENANT=str(MAX_QUEUED),
        BATCHD_ANTHROPIC_MAX_BATCH_REQUESTS=str(ANTHROPIC_MAX_REQUESTS),
    ) as srv:
        yield srv


@pytest.fixture()
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_base_url, api_key=KEY, max_retries=0)


@pytest.fixture()
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as raw:
        yield raw


def openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def params(content: str = "Hi") -> dict[str, Any]:
    return {
        "model": "default",
        "max_tokens": 2,
        "temperature": 0,
        "messages": [{"role": "user", "content": content}],
    }


def run_file(client: openai.OpenAI, content: bytes) -> Any:
    batch = client.batches.create(
        input_file_id=upload(client, content),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    return wait_for(client, batch.id)


def nested_line(custom_id: str, levels: int) -> bytes:
    """A chat line nested ``levels`` deep in all (the line object is level 1, its body 2)."""
    extra = levels - 2
    line = chat_line(custom_id, "Hi", max_tokens=2)
    raw = json.dumps(line).encode()
    return raw[:-2] + b', "x": ' + b"[" * extra + b"]" * extra + b"}}"


# ---------------------------------------------------------------------------- upload size


def test_an_upload_over_the_limit_is_a_413_naming_the_limit_and_its_size(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    content = jsonl([chat_line(f"r{i}", "x" * 200) for i in range(20)])
    assert len(content) > MAX_UPLOAD_BYTES
    with pytest.raises(openai.APIStatusError) as excinfo:
        client.files.create(file=("big.jsonl", content), purpose="batch")
    assert excinfo.value.status_code == 413
    error = excinfo.value.body
    assert isinstance(error, dict)
    assert error["code"] == "request_too_large" and error["param"] == "file", error
    assert f"the limit is {MAX_UPLOAD_BYTES} bytes" in error["message"], error
    declared = excinfo.value.response.request.headers["content-length"]
    assert f"Content-Length is {declared} bytes" in error["message"], error

    # Chunked, with no Content-Length: what had arrived when it was cut off is named.
    boundary = "limitsboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
    ).encode()

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(10):
            yield b"x" * 1000

    response = httpx.post(
        f"{server.url}/v1/files",
        content=chunks(),
        headers={
            "Authorization": f"Bearer {KEY}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
        timeout=60,
    )
    error = openai_error(response, 413)
    assert "Content-Length" not in error["message"], error
    assert "bytes of it had arrived when the upload was cut off" in error["message"], error
    received = int(error["message"].split("File is too large: ")[1].split(" ")[0])
    assert MAX_UPLOAD_BYTES < received <= 10_000, error
    assert client.files.create(file=("ok.jsonl", content[:2000]), purpose="batch").bytes == 2000


# ------------------------------------------------------------------- lines of a batch file


def test_a_line_over_the_length_limit_names_the_line_its_length_and_the_limit(
    client: openai.OpenAI,
) -> None:
    long_line = json.dumps(chat_line("long", "y" * 1200, max_tokens=2)).encode()
    short = json.dumps(chat_line("short", "Hi", max_tokens=2)).encode()
    batch = run_file(client, short + b"\n" + long_line + b"\r\n" + short.replace(b"short", b"s2"))
    assert batch.status == "failed", batch
    (error,) = batch.errors.data
    assert error.code == "line_too_large" and error.line == 2, error
    assert error.message == (
        f"Line 2 is {len(long_line)} bytes long; the limit is {MAX_LINE_BYTES} bytes per line"
        " (max_line_bytes)."
    )


def test_a_line_nested_deeper_than_the_json_depth_setting_fails_naming_the_line(
    client: openai.OpenAI,
) -> None:
    at_limit = nested_line("at-limit", MAX_JSON_DEPTH)
    batch = run_file(client, at_limit + b"\n")
    assert batch.status == "completed", batch  # exactly the limit is allowed

    too_deep = nested_line("too-deep", MAX_JSON_DEPTH + 2)
    batch = run_file(client, at_limit + b"\n" + too_deep + b"\n")
    assert batch.status == "failed", batch
    (error,) = batch.errors.data
    assert error.code == "invalid_json_line" and error.line == 2, error
    assert f"nested too deeply, {MAX_JSON_DEPTH + 2} levels" in error.message, error
    assert f"the limit is {MAX_JSON_DEPTH} levels (max_json_depth)" in error.message, error


def test_a_realtime_body_nested_too_deep_names_its_depth(http: httpx.Client) -> None:
    body = {**params(), "metadata_x": [[[[[[[[1]]]]]]]]}  # 1 + 8 levels
    error = openai_error(http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "body", error
    assert error["message"] == (
        f"The request body is nested 9 levels deep; more than {MAX_JSON_DEPTH} levels is refused"
        " (max_json_depth)."
    )


def test_a_file_with_more_lines_than_the_limit_fails_naming_both_counts(
    client: openai.OpenAI,
) -> None:
    lines = [chat_line(f"r{i}", "Hi", max_tokens=1) for i in range(MAX_BATCH_LINES + 1)]
    batch = run_file(client, jsonl(lines))
    assert batch.status == "failed", batch
    (error,) = batch.errors.data
    assert error.code == "too_many_tasks", error
    assert error.message == (
        f"The file has {MAX_BATCH_LINES + 1} requests; the limit is {MAX_BATCH_LINES} requests"
        " per batch (max_batch_lines)."
    )


def test_a_file_past_the_queued_requests_limit_fails_at_validation(
    server: ServerProcess,
) -> None:
    """Admitted at create (its size unknown), refused once validation has counted it."""
    mine = openai.OpenAI(base_url=server.openai_base_url, api_key=QUEUE_KEY, max_retries=0)
    lines = [chat_line(f"q{i}", "Hi", max_tokens=1) for i in range(MAX_QUEUED + 1)]
    batch = mine.batches.create(
        input_file_id=upload(mine, lines), endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_for(mine, batch.id)
    assert done.status == "failed", done
    (error,) = done.errors.data
    assert error.code == "queued_request_limit_exceeded", error
    assert error.param == "max_queued_requests_per_tenant" and error.line is None, error
    assert (
        f"this batch has {MAX_QUEUED + 1} requests and this key already has 0 requests"
        f" waiting or running, {MAX_QUEUED + 1} in all; the limit is {MAX_QUEUED} queued"
        " requests per key" in error.message
    ), error
    assert done.request_counts.total == 0  # nothing of it was queued
    # One that fits runs.
    fits = mine.batches.create(
        input_file_id=upload(mine, lines[:MAX_QUEUED]),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    assert wait_for(mine, fits.id).status == "completed"


def test_anthropic_requests_per_batch_limit(server: ServerProcess) -> None:
    claude = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)
    requests: Any = [
        {"custom_id": f"r{i}", "params": params()} for i in range(ANTHROPIC_MAX_REQUESTS + 1)
    ]
    with pytest.raises(anthropic.BadRequestError) as excinfo:
        claude.messages.batches.create(requests=requests)
    body = excinfo.value.body
    assert isinstance(body, dict) and body["type"] == "error", body
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"] == (
        f"requests: the batch has {ANTHROPIC_MAX_REQUESTS + 1} requests; the limit is"
        f" {ANTHROPIC_MAX_REQUESTS} requests per batch (anthropic_max_batch_requests)."
    )
    batch = claude.messages.batches.create(requests=requests[:ANTHROPIC_MAX_REQUESTS])
    assert batch.request_counts.processing == ANTHROPIC_MAX_REQUESTS
    deadline = time.monotonic() + 120
    while claude.messages.batches.retrieve(batch.id).processing_status != "ended":
        assert time.monotonic() < deadline
        time.sleep(0.2)


# ------------------------------------------------------------------ metadata and listings


def test_metadata_key_and_value_lengths(client: openai.OpenAI) -> None:
    file_id = upload(client, [chat_line("a", "Hi", max_tokens=1)])

    def create(metadata: dict[str, str]) -> Any:
        return client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata=metadata,
        )

    with pytest.raises(openai.BadRequestError) as excinfo:
        create({"k" * 65: "v"})
    error = excinfo.value.body
    assert isinstance(error, dict) and error["param"] == "metadata", error
    assert "has 65 characters; at most 64 are allowed" in error["message"], error

    with pytest.raises(openai.BadRequestError) as excinfo:
        create({"key": "v" * 513})
    error = excinfo.value.body
    assert isinstance(error, dict) and error["param"] == "metadata.key", error
    assert "metadata['key'] has 513 characters; at most 512 are allowed" in error["message"]

    at_limits = create({"k" * 64: "v" * 512})
    assert at_limits.metadata == {"k" * 64: "v" * 512}
    wait_for(client, at_limits.id)


@pytest.mark.parametrize("limit", ["0", "10001", "-3"])
def test_files_list_limit_out_of_range(http: httpx.Client, limit: str) -> None:
    error = openai_error(http.get("/v1/files", params={"limit": limit}), 400)
    assert error["param"] == "limit" and error["code"] == "invalid_value", error
    bound = "greater than or equal to 1" if int(limit) < 1 else "less than or equal to 10000"
    assert bound in error["message"] and f"(got '{limit}')" in error["message"], error


def test_files_list_limit_in_range(http: httpx.Client) -> None:
    for limit in ("1", "10000"):
        assert http.get("/v1/files", params={"limit": limit}).status_code == 200


# --------------------------------------------------------- per-tenant admission, raced


def race(creates: list[Callable[[], Any]]) -> list[Any]:
    """Run the creates at once, each in its own thread; their results or exceptions."""
    outcomes: list[Any] = [None] * len(creates)
    start = threading.Barrier(len(creates))

    def run(index: int) -> None:
        start.wait()
        try:
            outcomes[index] = creates[index]()
        except Exception as exc:  # the outcome under test
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(creates))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return outcomes


def split(outcomes: list[Any], error_type: type[Exception]) -> tuple[list[Any], list[Any]]:
    made = [o for o in outcomes if not isinstance(o, Exception)]
    refused = [o for o in outcomes if isinstance(o, error_type)]
    assert len(made) + len(refused) == len(outcomes), outcomes  # nothing else went wrong
    return made, refused


RACERS = 8
RACE_ADMITS = 3
RACE_BATCH_REQUESTS = 200
KEY_A, KEY_B = "race-tenant-a01", "race-tenant-b01"


def test_racing_anthropic_creates_admit_exactly_the_queued_limit(tmp_path: Path) -> None:
    """Eight creates of 200 requests each race for a queue of 600: exactly three get in.

    Another tenant's batch, created first (so every one of its rows is leased before any of
    the racers'), keeps the engine busy: the racers' requests stay queued, and the room they
    race for is exactly the limit."""
    limit = RACE_ADMITS * RACE_BATCH_REQUESTS
    with running_server(
        tmp_path,
        BATCHD_API_KEYS=f"{KEY_A},{KEY_B}",
        BATCHD_MAX_QUEUED_REQUESTS_PER_TENANT=str(limit),
    ) as server:
        blocker_client = openai.OpenAI(
            base_url=server.openai_base_url, api_key=KEY_A, max_retries=0
        )
        blocker_lines = [chat_line(f"b{i}", f"Story {i}", max_tokens=8) for i in range(limit)]
        blocker = blocker_client.batches.create(
            input_file_id=upload(blocker_client, blocker_lines),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        wait_for(blocker_client, blocker.id, ("in_progress",), timeout=120)

        claude = anthropic.Anthropic(base_url=server.url, api_key=KEY_B, max_retries=0)

        def create(racer: int) -> Callable[[], Any]:
            requests: Any = [
                {"custom_id": f"r{racer}-{i}", "params": params()}
                for i in range(RACE_BATCH_REQUESTS)
            ]
            return lambda: claude.messages.batches.create(requests=requests)

        made, refused = split(race([create(i) for i in range(RACERS)]), anthropic.RateLimitError)
        assert len(made) == RACE_ADMITS, (len(made), [str(r) for r in refused])
        for error in refused:
            assert error.response.headers["retry-after"] == "60"
            message = error.body["error"]["message"]  # type: ignore[index]
            assert (
                f"this key has {limit} requests waiting or running and this batch adds"
                f" {RACE_BATCH_REQUESTS}; the limit is {limit}." in message
            ), message
        # The room was exactly the limit: none of the admitted requests had run meanwhile.
        for batch in made:
            counts = claude.messages.batches.retrieve(batch.id).request_counts
            assert counts.processing == RACE_BATCH_REQUESTS, counts
        assert blocker_client.batches.retrieve(blocker.id).status == "in_progress"
        for batch in made:
            claude.messages.batches.cancel(batch.id)
        blocker_client.batches.cancel(blocker.id)
        wait_for(blocker_client, blocker.id)


def _api_replica(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "batchd.cli", "api", "--port", str(port)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
    )


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 180
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)


def test_racing_creates_across_two_api_replicas_on_postgresql(
    postgres_url: str,
    tmp_path: Path,
) -> None:
    """Two `batchd api` replicas share one PostgreSQL database and no worker runs, so nothing
    queued ever ends: creates raced through both replicas get in exactly up to the limit,
    for the batches limit (OpenAI) and the queued-requests limit (Anthropic)."""
    queued_limit = 2 * 3 + 1  # room for two batches of three, not three
    env = {
        "BATCHD_DATABASE_URL": postgres_url,
        "BATCHD_DATA_DIR": str(tmp_path / "shared"),
        "BATCHD_API_KEYS": f"{KEY_A},{KEY_B}",
        "BATCHD_MAX_ACTIVE_BATCHES_PER_TENANT": str(RACE_ADMITS),
        "BATCHD_MAX_QUEUED_REQUESTS_PER_TENANT": str(queued_limit),
        "BATCHD_MAX_SEQS": "2",
        "BATCHD_CTX_SIZE": "1024",
        "BATCHD_N_THREADS": "1",
    }
    ports = [free_port(), free_port()]
    logs = [tmp_path / f"api{i}.log" for i in range(2)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port, log in zip(ports, logs, strict=True):
            procs.append(_api_replica(port, env, log))
            _wait_healthy(procs[-1], port, log)
        clients = [
            openai.OpenAI(base_url=f"http://127.0.0.1:{p}/v1", api_key=KEY_A, max_retries=0)
            for p in ports
        ]
        file_id = upload(clients[0], [chat_line("a", "Hi", max_tokens=1)])

        def openai_create(index: int) -> Callable[[], Any]:
            return lambda: clients[index % 2].batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )

        made, refused = split(
            race([openai_create(i) for i in range(RACERS)]), openai.RateLimitError
        )
        assert len(made) == RACE_ADMITS, (len(made), [str(r) for r in refused])
        for error in refused:
            assert (
                f"this key has {RACE_ADMITS} batches that have not ended; the limit is"
                f" {RACE_ADMITS}." in error.message
            ), error.message
        assert {clients[0].batches.retrieve(b.id).status for b in made} == {"validating"}

        claudes = [
            anthropic.Anthropic(base_url=f"http://127.0.0.1:{p}", api_key=KEY_B, max_retries=0)
            for p in ports
        ]

        def anthropic_create(index: int) -> Callable[[], Any]:
            requests: Any = [{"custom_id": f"r{index}-{i}", "params": params()} for i in range(3)]
            return lambda: claudes[index % 2].messages.batches.create(requests=requests)

        made, refused = split(
            race([anthropic_create(i) for i in range(RACERS)]), anthropic.RateLimitError
        )
        assert len(made) == 2, (len(made), [str(r) for r in refused])
        for error in refused:
            message = error.body["error"]["message"]  # type: ignore[index]
            assert (
                f"this key has 6 requests waiting or running and this batch adds 3; the limit"
                f" is {queued_limit}." in message
            ), message
    finally:
        for proc in procs:
            stop_process(proc)
