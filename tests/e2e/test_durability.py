"""Crash safety and expiry, each on its own real server (real engine, bundled model)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import openai
import pytest

from tests.support.helpers import chat_line, read_jsonl, upload, wait_for
from tests.support.serverproc import ServerProcess, running_server

pytestmark = pytest.mark.slow


def finished_rows(data_dir: Path, batch_id: str) -> dict[str, bytes]:
    with sqlite3.connect(data_dir / "batchd.sqlite3") as conn:
        return dict(
            conn.execute(
                "SELECT custom_id, result FROM requests WHERE batch_id = ? AND state = 'succeeded'",
                (batch_id,),
            ).fetchall()
        )


def test_kill9_mid_run_then_restart_answers_every_request_exactly_once(data_dir: Path) -> None:
    lines = [
        chat_line(f"k-{i}", f"Tell me a fact about the number {i}.", max_tokens=48)
        for i in range(40)
    ]
    server = ServerProcess(data_dir=data_dir).start()
    try:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0)
        batch = client.batches.create(
            input_file_id=upload(client, lines),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        deadline = time.monotonic() + 180
        while client.batches.retrieve(batch.id).request_counts.completed < 5:
            assert time.monotonic() < deadline, "no progress before the kill"
            time.sleep(0.1)
        server.kill9()
    finally:
        server.stop()

    before = finished_rows(data_dir, batch.id)
    assert 5 <= len(before) < len(lines), "the kill must land mid-run"

    with running_server(data_dir) as restarted:
        client = openai.OpenAI(base_url=restarted.openai_base_url, api_key="x", max_retries=0)
        batch = wait_for(client, batch.id, timeout=300)
        assert batch.status == "completed"
        assert batch.request_counts.total == 40 and batch.request_counts.completed == 40
        output = read_jsonl(client, batch.output_file_id)
    assert sorted(row["custom_id"] for row in output) == sorted(line["custom_id"] for line in lines)
    by_id = {row["custom_id"]: row["response"]["body"] for row in output}
    for custom_id, stored in before.items():
        # Same completion id and text: the finished request was not recomputed.
        assert by_id[custom_id] == json.loads(stored)


def test_expiry_ends_unfinished_requests(data_dir: Path) -> None:
    # Far more work than one minute holds on two cores: the window closes mid-run.
    # Short answers, so the first ones land within seconds even on a loaded machine.
    lines = [
        chat_line(f"e-{i}", f"Write about topic number {i}.", max_tokens=24) for i in range(3000)
    ]
    with running_server(data_dir) as server:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0)
        batch = client.batches.create(
            input_file_id=upload(client, lines),
            endpoint="/v1/chat/completions",
            completion_window="1m",
        )
        assert batch.expires_at == batch.created_at + 60
        batch = wait_for(client, batch.id, timeout=180)
        assert batch.status == "expired"
        assert batch.expired_at is not None and batch.expired_at >= batch.expires_at
        output = read_jsonl(client, batch.output_file_id)
        errors = read_jsonl(client, batch.error_file_id)
    assert len(output) + len(errors) == 3000
    assert len({row["custom_id"] for row in output + errors}) == 3000
    assert len(output) >= 1, "work finished before the deadline is delivered"
    assert errors and all(row["error"]["code"] == "batch_expired" for row in errors)
    assert batch.request_counts.completed == len(output)
