"""Fixtures for the service layer's unit tests: ``Services`` on a temporary SQLite store, a
directory blob store and the fake engine, with no scheduler (an API-only process's shape: the
use cases never need one). No model, no HTTP, no subprocess: tests/e2e cover those."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchd.blobs.local import DirectoryBlobStore
from batchd.config import Settings
from batchd.engines.fake import FakeEngine
from batchd.service import files
from batchd.service.services import Services
from batchd.store import database
from batchd.store.records import BatchStatus, FileRecord
from batchd.store.store import Store

TENANT = "tenant-a"
OTHER = "tenant-b"
CHAT = "/v1/chat/completions"
LINE = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'

MakeServices = Callable[..., Services]


@pytest.fixture()
def make_services(tmp_path: Path) -> MakeServices:
    """``make_services(**settings)``: services whose settings take these overrides."""

    def make(**overrides: Any) -> Services:
        engine = database.open_sqlite(tmp_path / "db.sqlite3")
        database.upgrade(engine)
        settings = Settings(data_dir=tmp_path, **overrides)
        blobs = DirectoryBlobStore(settings.files_dir)
        return Services(settings, Store(engine), blobs, FakeEngine(), None)

    return make


@pytest.fixture()
def services(make_services: MakeServices) -> Services:
    return make_services()


def upload(
    services: Services,
    data: bytes = LINE,
    *,
    purpose: str = "batch",
    filename: str = "in.jsonl",
    tenant: str = TENANT,
    key: str | None = None,
) -> FileRecord:
    """A file uploaded the way the upload route stores it."""
    writer = services.blobs.new_writer()
    writer.write(data)
    return files.store_upload(
        services, tenant, purpose=purpose, filename=filename, writer=writer, idempotency_key=key
    )


def batch_body(input_file_id: str, **overrides: Any) -> dict[str, Any]:
    return {
        "input_file_id": input_file_id,
        "endpoint": CHAT,
        "completion_window": "24h",
        **overrides,
    }


def message_request(custom_id: str) -> dict[str, Any]:
    params = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    return {"custom_id": custom_id, "params": params}


def message_body(*custom_ids: str) -> dict[str, Any]:
    return {"requests": [message_request(c) for c in custom_ids]}


def end_batch(services: Services, batch_id: str, status: BatchStatus) -> None:
    """Move a batch to ``status`` from wherever it is, as the scheduler would."""
    assert services.store.transition(batch_id, list(BatchStatus), status)


def blob_names(services: Services) -> list[str]:
    root = services.settings.files_dir
    return sorted(p.name for p in root.iterdir())
