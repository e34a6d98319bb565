"""Keys, tenants and per-tenant limits against real servers: a keys file shared by several keys,
SIGHUP reloads, every spelling of every path behind authentication, the refusal to expose an
unauthenticated server, and 429s in each surface's shape."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.support.helpers import chat_line, upload
from tests.support.serverproc import ServerProcess, free_port, running_server

ALPHA_1, ALPHA_2, BETA, ENV_KEY = "alpha-key-one", "alpha-key-two", "beta-key-0001", "env-key-0001"


def write_keys(path: Path, lines: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)  # atomically, as an operator's tooling would


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    data_dir = tmp_path_factory.mktemp("keyed")
    keys = data_dir.parent / f"{data_dir.name}-keys.txt"
    write_keys(keys, ["# team keys", f"{ALPHA_1} team-a", f"{ALPHA_2}   team-a", f"{BETA} team-b"])
    with running_server(data_dir, BATCHD_KEYS_FILE=str(keys), BATCHD_API_KEYS=ENV_KEY) as srv:
        yield srv, keys


def eventually(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def oai(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_base_url, api_key=key, max_retries=0)


def test_keys_of_one_tenant_share_its_objects_and_no_one_else_sees_them(
    keyed: tuple[ServerProcess, Path],
) -> None:
    server, _ = keyed
    file_id = upload(oai(server, ALPHA_1), [chat_line("a", "Hi", max_tokens=1)])
    assert oai(server, ALPHA_2).files.retrieve(file_id).id == file_id  # same tenant
    for stranger in (BETA, ENV_KEY):
        with pytest.raises(openai.NotFoundError):
            oai(server, stranger).files.retrieve(file_id)
        assert file_id not in [f.id for f in oai(server, stranger).files.list()]
    with pytest.raises(openai.AuthenticationError) as excinfo:
        oai(server, "not-a-key-at-all").files.list()
    assert excinfo.value.body["code"] == "invalid_api_key"  # type: ignore[index]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/batches"),
        ("GET", "//v1/batches"),
        ("GET", "/v1/batches/"),
        ("GET", "/v1//batches"),
        ("HEAD", "/v1/batches"),
        ("OPTIONS", "/v1/batches"),
        ("GET", "/v1/files/"),
        ("POST", "/v1/chat/completions/"),
        ("GET", "/v1/no-such-route"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/v1/messages/batches"),
        ("GET", "//v1/messages/batches/"),
        ("OPTIONS", "/v1/messages"),
        ("GET", "/healthz/"),
        ("POST", "/healthz"),
    ],
)
def test_every_spelling_of_every_path_needs_a_key(
    keyed: tuple[ServerProcess, Path], method: str, path: str
) -> None:
    server, _ = keyed
    response = httpx.request(method, server.url + path, timeout=30)
    assert response.status_code == 401, (path, response.status_code, response.text)
    if method == "HEAD":
        return
    body = response.json()
    if "/v1/messages" in path.replace("//", "/"):
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    else:
        assert body["error"]["code"] == "invalid_api_key"


def test_healthz_is_open_and_says_nothing_about_tenants(keyed: tuple[ServerProcess, Path]) -> None:
    server, _ = keyed
    for method in ("GET", "HEAD"):
        response = httpx.request(method, f"{server.url}/healthz", timeout=30)
        assert response.status_code == 200
    assert httpx.get(f"{server.url}/healthz", timeout=30).json() == {"status": "ok"}


def test_two_different_keys_in_one_request_are_refused(keyed: tuple[ServerProcess, Path]) -> None:
    server, _ = keyed

    def get(headers: dict[str, str]) -> httpx.Response:
        return httpx.get(f"{server.url}/v1/messages/batches", headers=headers, timeout=30)

    same = get({"authorization": f"Bearer {ALPHA_1}", "x-api-key": ALPHA_1})
    assert same.status_code == 200
    both_valid = get({"authorization": f"Bearer {ALPHA_1}", "x-api-key": BETA})
    assert both_valid.status_code == 401
    assert "different keys" in both_valid.json()["error"]["message"]


def test_sighup_reloads_the_keys_file_and_a_broken_file_changes_nothing(
    keyed: tuple[ServerProcess, Path],
) -> None:
    server, keys = keyed
    assert server.proc is not None
    gamma = "gamma-key-0001"
    write_keys(keys, [f"{ALPHA_1} team-a", f"{gamma} team-b"])  # beta retired, gamma joins b
    server.proc.send_signal(signal.SIGHUP)
    eventually(lambda: _status(server, gamma) == 200, timeout=30)
    assert _status(server, BETA) == 401
    assert _status(server, ALPHA_2) == 401
    assert _status(server, ENV_KEY) == 200  # environment keys are not the file's to remove

    write_keys(keys, [f"{ALPHA_1} team-a", "just-one-field"])
    server.proc.send_signal(signal.SIGHUP)
    eventually(lambda: "keys file not reloaded" in server.log(), timeout=30)
    assert _status(server, gamma) == 200  # the previous keys stay in force
    assert "just-one-field" not in server.log()  # a key is never logged
    assert _status(server, ALPHA_1) == 200


def _status(server: ServerProcess, key: str) -> int:
    response = httpx.get(
        f"{server.url}/v1/files", headers={"authorization": f"Bearer {key}"}, timeout=30
    )
    return response.status_code


def _serve(data_dir: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
    return subprocess.Popen(
        [sys.executable, "-m", "batchd.cli", "serve", "--data-dir", str(data_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**clean, "BATCHD_MAX_SEQS": "4", "BATCHD_CTX_SIZE": "2048", **env},
    )


def test_an_exposed_address_without_keys_is_refused_unless_insecure(tmp_path: Path) -> None:
    port = str(free_port())
    refused = _serve(tmp_path / "a", "--host", "0.0.0.0", "--port", port)
    out, _ = refused.communicate(timeout=60)
    assert refused.returncode == 2
    assert b"--insecure-no-auth" in out and b"refusing to serve 0.0.0.0" in out

    bad_keys = tmp_path / "keys.txt"
    bad_keys.write_text("tiny team\n")
    broken = _serve(tmp_path / "b", "--port", port, "--keys-file", str(bad_keys))
    out, _ = broken.communicate(timeout=60)
    assert broken.returncode == 2 and b"keys.txt:1" in out and b"tiny" not in out

    allowed = _serve(tmp_path / "c", "--host", "0.0.0.0", "--port", port, "--insecure-no-auth")
    try:
        eventually(lambda: _healthy(f"http://127.0.0.1:{port}"), timeout=120)
    finally:
        allowed.terminate()
        allowed.wait(timeout=30)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_per_tenant_limits_answer_429_in_each_surface_shape(tmp_path: Path) -> None:
    env = {
        "BATCHD_API_KEYS": f"{ALPHA_1},{BETA}",
        "BATCHD_MAX_ACTIVE_BATCHES_PER_TENANT": "1",
        "BATCHD_MAX_QUEUED_REQUESTS_PER_TENANT": "4",
    }
    with running_server(tmp_path, **env) as server:
        claude = anthropic.Anthropic(base_url=server.url, api_key=ALPHA_1, max_retries=0)

        def ask(i: int) -> Any:
            params = {"model": "default", "max_tokens": 64, "temperature": 0}
            content = f"Write a long story about day {i}."
            return {
                "custom_id": f"r{i}",
                "params": {**params, "messages": [{"role": "user", "content": content}]},
            }

        with pytest.raises(anthropic.RateLimitError) as too_many:
            claude.messages.batches.create(requests=[ask(i) for i in range(5)])
        assert too_many.value.response.headers["retry-after"] == "60"
        body = too_many.value.body
        assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
        assert "adds 5; the limit is 4" in body["error"]["message"]  # type: ignore[index]

        running = claude.messages.batches.create(requests=[ask(i) for i in range(4)])
        mine = oai(server, ALPHA_1)
        file_id = upload(mine, [chat_line("x", "Hi", max_tokens=1)])
        with pytest.raises(openai.RateLimitError) as busy:
            mine.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert busy.value.response.headers["retry-after"] == "60"
        assert "the limit is 1" in busy.value.message

        # Another tenant is not held back by this one's queue.
        theirs = oai(server, BETA)
        other_file = upload(theirs, [chat_line("y", "Hi", max_tokens=1)])
        theirs.batches.create(
            input_file_id=other_file, endpoint="/v1/chat/completions", completion_window="24h"
        )

        claude.messages.batches.cancel(running.id)
        deadline = time.monotonic() + 120
        while claude.messages.batches.retrieve(running.id).processing_status != "ended":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        mine.batches.create(  # room again once the first batch has ended
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
