"""Retention against a real server with short settings, seen over HTTP with the SDKs: expired
batch input files answer 404 (and leave the listing), ended batches are archived (a message
batch shows ``archived_at`` and its results answer 404; an OpenAI batch keeps its object and
counts), and the input file of a batch that is still running is never purged."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.support.helpers import chat_line, eventually, file_gone, upload, wait_for
from tests.support.serverproc import ServerProcess, running_server

KEY = "retention-key-01"
FILE_RETENTION_SECONDS = 6
LONG_BATCH_REQUESTS = 300


def archived_at(server: ServerProcess, batch_id: str) -> int | None:
    """The batch row's archived_at, read from the server's SQLite file (an OpenAI batch object
    has no such field); read-only, beside the running server."""
    path = server.data_dir / "batchd.sqlite3"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
        row = db.execute("SELECT archived_at FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return None if row is None else row[0]


def stored_bodies(server: ServerProcess, batch_id: str) -> int:
    path = server.data_dir / "batchd.sqlite3"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
        (count,) = db.execute(
            "SELECT count(*) FROM requests WHERE batch_id = ? AND length(body) > 0", (batch_id,)
        ).fetchone()
        return int(count)


def ask(custom_id: str) -> Any:
    params = {"model": "default", "max_tokens": 2, "temperature": 0}
    return {
        "custom_id": custom_id,
        "params": {**params, "messages": [{"role": "user", "content": "Hi"}]},
    }


def test_expired_files_go_ended_batches_are_archived_and_a_running_batch_keeps_its_input(
    tmp_path: Path,
) -> None:
    with running_server(
        tmp_path,
        BATCHD_API_KEYS=KEY,
        BATCHD_RETENTION_INTERVAL_SECONDS="0.5",
        BATCHD_FILE_RETENTION_SECONDS=str(FILE_RETENTION_SECONDS),
        BATCHD_BATCH_DATA_RETENTION_SECONDS="1",
        BATCHD_ANTHROPIC_RESULTS_RETENTION_SECONDS="1",
    ) as server:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key=KEY, max_retries=0)
        claude = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)

        # Two batches that end soon...
        small_input = upload(client, [chat_line(f"s{i}", "Hi", max_tokens=2) for i in range(2)])
        small = client.batches.create(
            input_file_id=small_input, endpoint="/v1/chat/completions", completion_window="24h"
        )
        message_batch = claude.messages.batches.create(requests=[ask("m0"), ask("m1")])
        # ...one that runs throughout (a later deadline: its rows are leased after theirs)...
        long_lines = [
            chat_line(f"l{i}", f"Tell a story about {i}.", max_tokens=8)
            for i in range(LONG_BATCH_REQUESTS)
        ]
        long_input = upload(client, long_lines)
        long = client.batches.create(
            input_file_id=long_input, endpoint="/v1/chat/completions", completion_window="48h"
        )
        # ...and a file nothing reads, uploaded last: it expires after all the others.
        decoy = client.files.create(file=("decoy.jsonl", b'{"custom_id": "d"}\n'), purpose="batch")
        assert decoy.expires_at == decoy.created_at + FILE_RETENTION_SECONDS

        small_done = wait_for(client, small.id)
        assert small_done.status == "completed"
        output = client.files.retrieve(small_done.output_file_id)
        assert output.expires_at == output.created_at + FILE_RETENTION_SECONDS

        # The decoy's going means a retention pass ran after every input above expired.
        eventually(lambda: file_gone(client, decoy.id), "the unused file expires")
        with pytest.raises(openai.NotFoundError):
            client.files.content(decoy.id)
        assert decoy.id not in [f.id for f in client.files.list()]

        # The running batch's input survived that pass: it is read after the pass and the
        # batch is seen running after that read.
        assert client.files.retrieve(long_input).id == long_input
        assert client.batches.retrieve(long.id).status == "in_progress", (
            "the long batch ended before the check; make it longer"
        )
        assert archived_at(server, long.id) is None

        # The ended batch's input is purged; the batch is archived, its object and counts kept.
        eventually(lambda: file_gone(client, small_input), "the small batch's input expires")
        eventually(lambda: archived_at(server, small.id) is not None, "the small batch archived")
        # Its output file expires after the same time as an input.
        eventually(lambda: file_gone(client, output.id), "the small batch's output expires")
        assert stored_bodies(server, small.id) == 0
        kept = client.batches.retrieve(small.id)
        assert kept.status == "completed" and kept.request_counts.completed == 2, kept

        # A message batch is archived once ended: archived_at shows, results answer 404.
        def message_batch_archived() -> bool:
            return claude.messages.batches.retrieve(message_batch.id).archived_at is not None

        eventually(message_batch_archived, "the message batch archived")
        archived = claude.messages.batches.retrieve(message_batch.id)
        assert archived.processing_status == "ended" and archived.results_url is None
        assert archived.request_counts.succeeded == 2, archived.request_counts
        results = httpx.get(
            f"{server.url}/v1/messages/batches/{message_batch.id}/results",
            headers={"x-api-key": KEY},
            timeout=30,
        )
        assert results.status_code == 404, results.text
        body = results.json()
        assert body["type"] == "error" and body["error"]["type"] == "not_found_error", body
        assert "archived" in body["error"]["message"], body

        # Once the long batch has ended, its input goes too.
        client.batches.cancel(long.id)
        assert wait_for(client, long.id).status == "cancelled"
        eventually(lambda: file_gone(client, long_input), "the long batch's input expires")
        eventually(lambda: archived_at(server, long.id) is not None, "the long batch archived")
