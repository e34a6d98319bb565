"""An Idempotency-Key survives a kill -9 at every step of a create, on each surface.

Each case makes a process stop at a failpoint inside a create with a key, kills it there with
SIGKILL, and retries with the same key through a fresh process: exactly one object exists
afterwards, and every retry returns it. On SQLite the retry goes to the restarted server; on
PostgreSQL to a second API replica that kept running. The failpoints, in create order:

- ``upload.blob_committed``: an upload's bytes are stored, no row names them yet;
- ``message_batch.rows_inserted``: a message batch's request rows are in, its batch row not;
- ``create_file.before_commit`` / ``create_batch.before_commit``: the object's row and its key
  are written in one open transaction;
- ``create.committed``: the transaction committed, the response not yet sent.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.support.helpers import API_KEY, chat_line, jsonl, upload
from tests.support.serverproc import ServerProcess, free_port

pytestmark = pytest.mark.slow

FAILPOINT_WAIT_SECONDS = 120
SMALL_ENGINE = {"BATCHD_MAX_SEQS": "2", "BATCHD_CTX_SIZE": "1024", "BATCHD_N_THREADS": "1"}
MESSAGE_REQUESTS = 3


class Surface:
    """One kind of create, driven through the official SDKs against a base URL."""

    name: str

    def prepare(self, url: str) -> None:
        """What the create needs that is not itself under test (made without a key)."""

    def create(self, url: str, key: str) -> str:
        raise NotImplementedError

    def count(self, url: str) -> int:
        """How many objects this surface's creates in this test made."""
        raise NotImplementedError


def openai_client(url: str, timeout: float = 180) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=timeout)


class Files(Surface):
    name = "files"

    def __init__(self) -> None:
        self.filename = f"crash-{uuid.uuid4().hex[:8]}.jsonl"

    def create(self, url: str, key: str) -> str:
        data = jsonl([chat_line("a", "Hi", max_tokens=1)])
        made = openai_client(url).files.create(
            file=(self.filename, data), purpose="batch", extra_headers={"Idempotency-Key": key}
        )
        return made.id

    def count(self, url: str) -> int:
        return sum(f.filename == self.filename for f in openai_client(url).files.list())


class Batches(Surface):
    name = "batches"
    input_file_id = ""

    def prepare(self, url: str) -> None:
        self.input_file_id = upload(openai_client(url), [chat_line("a", "Hi", max_tokens=1)])

    def create(self, url: str, key: str) -> str:
        made = openai_client(url).batches.create(
            input_file_id=self.input_file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_headers={"Idempotency-Key": key},
        )
        return made.id

    def count(self, url: str) -> int:
        listed = openai_client(url).batches.list(limit=100)
        return sum(b.input_file_id == self.input_file_id for b in listed.data)


class MessageBatches(Surface):
    name = "message_batches"

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:8]

    def create(self, url: str, key: str) -> str:
        claude = anthropic.Anthropic(base_url=url, api_key=API_KEY, max_retries=0, timeout=180)
        requests: Any = [
            {
                "custom_id": f"{self.tag}-{i}",
                "params": {
                    "model": "default",
                    "max_tokens": 1,
                    "messages": [{"role": "user", "content": "Hi"}],
                },
            }
            for i in range(MESSAGE_REQUESTS)
        ]
        made = claude.messages.batches.create(
            requests=requests, extra_headers={"Idempotency-Key": key}
        )
        return made.id

    def count(self, url: str) -> int:
        claude = anthropic.Anthropic(base_url=url, api_key=API_KEY, max_retries=0)
        batches = list(claude.messages.batches.list(limit=100))
        for batch in batches:  # no request of a batch inserted twice, none lost
            counts = batch.request_counts
            assert (
                sum((counts.processing, counts.succeeded, counts.errored, counts.canceled))
                + counts.expired
                == MESSAGE_REQUESTS
            ), counts
        return len(batches)


SURFACES: dict[str, Callable[[], Surface]] = {
    "files": Files,
    "batches": Batches,
    "message_batches": MessageBatches,
}

CASES = [
    ("files", "upload.blob_committed"),
    ("files", "create_file.before_commit"),
    ("files", "create.committed"),
    ("batches", "create_batch.before_commit"),
    ("batches", "create.committed"),
    ("message_batches", "message_batch.rows_inserted"),
    ("message_batches", "create_batch.before_commit"),
    ("message_batches", "create.committed"),
]


def wait_for_failpoint(log: Path, failpoint: str, caller: threading.Thread) -> None:
    """Until the process logs that it stopped at ``failpoint``."""
    deadline = time.monotonic() + FAILPOINT_WAIT_SECONDS
    needle = f"failpoint {failpoint} reached"
    while needle not in log.read_text(errors="replace"):
        assert caller.is_alive(), f"the create finished without reaching {failpoint}"
        assert time.monotonic() < deadline, f"{failpoint} not reached:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def create_killed_at(
    surface: Surface, url: str, key: str, failpoint: str, log: Path, kill: Callable[[], None]
) -> None:
    """Send the keyed create, kill the process once it stops at ``failpoint``; the create
    must not have been answered."""
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(surface.create(url, key))
        except Exception as exc:  # the connection dies with the process
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    wait_for_failpoint(log, failpoint, caller)
    kill()
    caller.join(timeout=60)
    assert len(outcome) == 1 and isinstance(
        outcome[0], openai.APIConnectionError | anthropic.APIConnectionError
    ), outcome


def retried_twice(surface: Surface, url: str, key: str) -> str:
    """Retry with the same key, twice: both answer with the one object, which is all there is."""
    first = surface.create(url, key)
    assert surface.create(url, key) == first
    assert surface.count(url) == 1
    return first


@pytest.mark.parametrize(("surface_name", "failpoint"), CASES)
def test_kill9_mid_create_then_the_retry_returns_the_one_object(
    tmp_path: Path, surface_name: str, failpoint: str
) -> None:
    data_dir = tmp_path / "data"
    surface = SURFACES[surface_name]()
    env = {**SMALL_ENGINE, "BATCHD_API_KEYS": API_KEY}
    stopping = ServerProcess(data_dir, env={**env, "BATCHD_FAILPOINTS": f"{failpoint}=sleep(600)"})
    stopping.start()
    try:
        surface.prepare(stopping.url)
        assert stopping.log_path is not None
        key = f"crash-{uuid.uuid4()}"
        create_killed_at(surface, stopping.url, key, failpoint, stopping.log_path, stopping.kill9)
    finally:
        stopping.stop()
    restarted = ServerProcess(data_dir, env=env).start()
    try:
        retried_twice(surface, restarted.url, key)
    finally:
        restarted.stop()


# ------------------------------------------------------------------ two API replicas


@contextlib.contextmanager
def api_replica(env: dict[str, str], log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = subprocess.Popen(
        [*ServerProcess.command(), "api", "--port", str(port)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=ServerProcess.environment(env),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


PG_CASES = [
    ("files", "create_file.before_commit"),
    ("batches", "create_batch.before_commit"),
    ("message_batches", "message_batch.rows_inserted"),
    ("message_batches", "create.committed"),
]


@pytest.mark.parametrize(("surface_name", "failpoint"), PG_CASES)
def test_kill9_mid_create_on_one_replica_then_the_other_returns_the_one_object(
    postgres_url: str,
    tmp_path: Path,
    surface_name: str,
    failpoint: str,
) -> None:
    surface = SURFACES[surface_name]()
    env = {
        **SMALL_ENGINE,
        "BATCHD_DATABASE_URL": postgres_url,
        "BATCHD_DATA_DIR": str(tmp_path / "shared"),
        "BATCHD_API_KEYS": API_KEY,
    }
    stopping_log, steady_log = tmp_path / "stopping.log", tmp_path / "steady.log"
    stopping_env = {**env, "BATCHD_FAILPOINTS": f"{failpoint}=sleep(600)"}
    with (
        api_replica(stopping_env, stopping_log) as (stopping_url, stopping),
        api_replica(env, steady_log) as (steady_url, _),
    ):
        surface.prepare(steady_url)
        key = f"crash-{uuid.uuid4()}"
        create_killed_at(
            surface, stopping_url, key, failpoint, stopping_log, lambda: kill9(stopping)
        )
        retried_twice(surface, steady_url, key)


def kill9(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(timeout=30)


def burst(surface: Surface, keys: list[str], urls: list[str]) -> dict[str, list[str]]:
    """Every key sent once to each of ``urls``, all at once; the ids answered, by key."""
    answers: dict[str, list[str]] = {key: [] for key in keys}
    errors: list[Exception] = []

    def send(url: str, key: str) -> None:
        try:
            answers[key].append(surface.create(url, key))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(url, key)) for key in keys for url in urls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return answers


def test_concurrent_creates_with_one_key_across_replicas_make_one_object(
    postgres_url: str,
    tmp_path: Path,
) -> None:
    """Twelve keys, each sent four times at once through two replicas: one object per key,
    and all four answers name it (no 409 for a request that is merely concurrent)."""
    env = {
        **SMALL_ENGINE,
        "BATCHD_DATABASE_URL": postgres_url,
        "BATCHD_DATA_DIR": str(tmp_path / "shared"),
        "BATCHD_API_KEYS": API_KEY,
    }
    with (
        api_replica(env, tmp_path / "a.log") as (url_a, _),
        api_replica(env, tmp_path / "b.log") as (url_b, _),
    ):
        for make in (Batches, MessageBatches):
            surface = make()
            surface.prepare(url_a)
            keys = [f"burst-{uuid.uuid4()}" for _ in range(12)]
            answers = burst(surface, keys, [url_a, url_b, url_a, url_b])
            assert all(len(set(ids)) == 1 and len(ids) == 4 for ids in answers.values()), answers
            assert surface.count(url_b) == len(keys)
