"""Fixtures for the scheduler's unit tests: a temporary SQLite store, a directory blob store and
fake engines, with helpers that build batches the way the API and validation would.

Everything runs in-process on the fake engine (no model, no HTTP, no subprocess). The real
llama.cpp engine and the HTTP surface are covered by tests/e2e.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from batchd import ids
from batchd.blobs.local import DirectoryBlobStore
from batchd.clock import now
from batchd.config import Settings
from batchd.engines.base import Engine, GenerationRequest, GenerationResult
from batchd.engines.fake import FAKE_MODEL, FakeEngine
from batchd.protocol.batch_file import prefix_key
from batchd.scheduler.runner import Scheduler
from batchd.store import schema
from batchd.store.records import (
    BatchRecord,
    BatchStatus,
    FileRecord,
    RequestLine,
    RequestOutcome,
    RequestState,
)
from batchd.store.store import Store

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
TENANT = "tenant-a"


# ----------------------------------------------------------------------------- engines


class RecordingEngine(FakeEngine):
    """The fake engine (instant), noting the last message of every request it is given, in
    the order given. ``capacity`` 1 makes the scheduler lease one row at a time, so the order
    the engine sees is the order rows were leased in."""

    def __init__(self, *, capacity: int = 128) -> None:
        super().__init__(step_seconds=0.0)
        self._capacity = capacity
        self.seen: list[str] = []

    def capacity(self) -> int:
        return self._capacity

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.seen.append(_last_text(request))
        return await super().generate(request)


class GatedEngine(RecordingEngine):
    """Holds every request until ``gate`` is set: a row stays in flight (running under the
    scheduler's lease) for as long as a test needs, with no sleeps or timing guesses."""

    def __init__(self, *, capacity: int = 1) -> None:
        super().__init__(capacity=capacity)
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.seen.append(_last_text(request))
        self.started.set()
        await self.gate.wait()
        return await FakeEngine.generate(self, request)


def _last_text(request: GenerationRequest) -> str:
    if request.messages:
        return request.messages[-1].content
    return request.prompt or ""


# ------------------------------------------------------------------------- request lines


def chat_body(text: str, *, system: str | None = None, model: str = FAKE_MODEL) -> dict[str, Any]:
    messages: list[dict[str, str]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": text})
    return {"model": model, "messages": messages}


def chat_line(
    custom_id: str, text: str, *, system: str | None = None, model: str = FAKE_MODEL
) -> bytes:
    """One line of an OpenAI batch input file."""
    line = {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": chat_body(text, system=system, model=model),
    }
    return orjson.dumps(line)


def chat_row(
    line_no: int, custom_id: str, text: str, *, system: str | None = None, model: str = FAKE_MODEL
) -> RequestLine:
    """The row validation would make of ``chat_line(custom_id, text, ...)`` at ``line_no``."""
    body = chat_body(text, system=system, model=model)
    return RequestLine(line_no, custom_id, orjson.dumps(body), model, prefix_key(model, body))


def message_row(line_no: int, custom_id: str, text: str, *, model: str = FAKE_MODEL) -> RequestLine:
    """A row of an Anthropic message batch: the request's ``params`` as its body."""
    params = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": text}]}
    return RequestLine(line_no, custom_id, orjson.dumps(params), model, prefix_key(model, params))


# ------------------------------------------------------------------------------ harness


@dataclass
class Harness:
    """The store, blobs and settings of one test, and the steps tests take on them."""

    store: Store
    blobs: DirectoryBlobStore
    settings: Settings

    def upload(self, lines: Sequence[bytes], *, tenant: str = TENANT) -> str:
        """Store ``lines`` as a batch input file (one per line, as written); its id."""
        writer = self.blobs.new_writer()
        writer.write(b"".join(line + b"\n" for line in lines))
        size = writer.size
        blob = writer.commit()
        file_id = ids.file_id()
        record = FileRecord(file_id, tenant, "input.jsonl", "batch", size, now(), None, blob)
        self.store.create_file(record)
        return file_id

    def openai_batch(
        self,
        file_id: str,
        *,
        tenant: str = TENANT,
        expires_in: int = 3600,
        batch_id: str | None = None,
    ) -> str:
        """A batch as the create endpoint leaves it: validating, no rows yet."""
        batch_id = batch_id or ids.batch_id()
        created = now()
        self.store.create_batch(
            {
                "id": batch_id,
                "tenant": tenant,
                "surface": "openai",
                "endpoint": CHAT,
                "input_file_id": file_id,
                "completion_window": "24h",
                "status": BatchStatus.VALIDATING.value,
                "created_at": created,
                "expires_at": created + expires_in,
            }
        )
        return batch_id

    def open_batch(
        self,
        rows: Sequence[RequestLine],
        *,
        surface: str = "openai",
        tenant: str = TENANT,
        expires_in: int = 3600,
        batch_id: str | None = None,
    ) -> str:
        """A batch already validated (or an Anthropic one, which has no validating step):
        in progress, its rows pending."""
        anthropic = surface == "anthropic"
        batch_id = batch_id or (ids.message_batch_id() if anthropic else ids.batch_id())
        created = now()
        self.store.create_batch(
            {
                "id": batch_id,
                "tenant": tenant,
                "surface": surface,
                "endpoint": MESSAGES if anthropic else CHAT,
                "input_file_id": None if anthropic else "file-unused",
                "completion_window": "24h",
                "status": BatchStatus.VALIDATING.value,
                "created_at": created,
                "expires_at": created + expires_in,
            }
        )
        assert self.store.insert_requests(batch_id, rows)
        assert self.store.transition(batch_id, [BatchStatus.VALIDATING], BatchStatus.IN_PROGRESS)
        return batch_id

    def finish_elsewhere(self, batch_id: str, count: int, result: bytes) -> list[int]:
        """Let another worker lease and finish ``count`` rows of the batch (they succeed with
        ``result``); their line numbers."""
        leased = self.store.lease("earlier-worker", count, 60)
        assert len(leased) == count and {r.batch_id for r in leased} == {batch_id}
        outcome = RequestOutcome(RequestState.SUCCEEDED, 200, result, 1, 1, 0)
        for item in leased:
            assert self.store.complete(item, "earlier-worker", outcome)
        return [item.line_no for item in leased]

    def set_deadline(self, batch_id: str, expires_at: int) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(
                schema.batches.update()
                .where(schema.batches.c.id == batch_id)
                .values(expires_at=expires_at)
            )

    def batch(self, batch_id: str) -> BatchRecord:
        record = self.store.get_batch(batch_id)
        assert record is not None
        return record

    def rows(self, batch_id: str) -> list[Any]:
        """Every request row of the batch, in line order."""
        r = schema.requests
        with self.store.engine.connect() as conn:
            return list(
                conn.execute(select(r).where(r.c.batch_id == batch_id).order_by(r.c.line_no))
            )

    def output_file_rows(self) -> list[Any]:
        f = schema.files
        with self.store.engine.connect() as conn:
            return list(conn.execute(select(f).where(f.c.purpose == "batch_output")))

    def read_jsonl(self, file_id: str | None, *, tenant: str = TENANT) -> list[dict[str, Any]]:
        assert file_id is not None
        record = self.store.get_file(tenant, file_id)
        assert record is not None
        with self.blobs.open(record.blob) as handle:
            data = handle.read()
        assert data.endswith(b"\n")
        return [orjson.loads(line) for line in data.splitlines()]

    def scheduler(self, engine: Engine | None = None) -> Scheduler:
        return Scheduler(self.store, self.blobs, engine or RecordingEngine(), self.settings)


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    # A short poll interval keeps each test fast; background_nice 0 leaves the test's threads
    # as they are; lease_seconds 60 keeps the heartbeat (every 20 s) out of every test.
    return Settings(
        data_dir=tmp_path,
        engine="fake",
        fake_step_seconds=0.0,
        poll_interval_seconds=0.02,
        lease_seconds=60,
        background_nice=0,
    )


@pytest.fixture()
def store(sqlite_store: Store) -> Store:
    return sqlite_store


@pytest.fixture()
def blobs(tmp_path: Path) -> DirectoryBlobStore:
    return DirectoryBlobStore(tmp_path / "files")


@pytest.fixture()
def harness(store: Store, blobs: DirectoryBlobStore, settings: Settings) -> Harness:
    return Harness(store, blobs, settings)


# ------------------------------------------------------------------------- async helpers


async def drain(scheduler: Scheduler, timeout: float = 10.0) -> None:
    """Run the scheduler until nothing is left for it to do, then stop it."""
    try:
        async with asyncio.timeout(timeout):
            await scheduler.run(drain=True)
    finally:
        await scheduler.stop()


def run_to_drained(scheduler: Scheduler, timeout: float = 10.0) -> None:
    asyncio.run(drain(scheduler, timeout))


async def wait_until(
    predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` (a plain callable; it may touch the database) until it is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
