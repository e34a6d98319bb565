"""The user CLI (`batchd submit | status | results | cancel | ls`) against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import API_KEY, chat_line, jsonl
from tests.serverproc import ServerProcess, free_port


def batchd(server_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchd.cli", *args, "--url", server_url, "--api-key", API_KEY],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_submit_wait_status_results_ls_cancel(server: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "questions.jsonl"
    source.write_bytes(jsonl([chat_line(f"cli-{i}", f"Say the number {i}.") for i in range(4)]))
    done = batchd(server.url, "submit", str(source), "--metadata", "team=cli")
    assert done.returncode == 0, done.stderr
    batch_id = done.stdout.strip().splitlines()[0]
    assert batch_id.startswith("batch_")
    output = tmp_path / "questions.output.jsonl"
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(row["custom_id"] for row in rows) == [f"cli-{i}" for i in range(4)]
    assert not (tmp_path / "questions.errors.jsonl").exists()

    shown = batchd(server.url, "status", batch_id, "--json")
    assert shown.returncode == 0
    status = json.loads(shown.stdout)
    assert status["status"] == "completed" and status["metadata"] == {"team": "cli"}
    assert status["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
    assert batchd(server.url, "status", batch_id).returncode == 0

    copy = tmp_path / "copy.jsonl"
    assert batchd(server.url, "results", batch_id, "-o", str(copy)).returncode == 0
    assert copy.read_bytes() == output.read_bytes()
    streamed = batchd(server.url, "results", batch_id)
    assert streamed.stdout.encode() == output.read_bytes()

    listed = batchd(server.url, "ls")
    assert listed.returncode == 0 and batch_id in listed.stdout

    refused = batchd(server.url, "cancel", batch_id)
    assert refused.returncode == 1
    assert "Cannot cancel a batch with status 'completed'" in refused.stderr


def test_submit_reports_structural_errors_with_line_numbers(
    server: ServerProcess, tmp_path: Path
) -> None:
    source = tmp_path / "dupes.jsonl"
    source.write_bytes(jsonl([chat_line("same", "a"), chat_line("same", "b")]))
    result = batchd(server.url, "submit", str(source))
    assert result.returncode != 0
    assert "line 2" in result.stderr and "duplicate_custom_id" in result.stderr


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    result = batchd(f"http://127.0.0.1:{free_port()}", "ls")
    assert result.returncode == 1
    assert "cannot reach a batchd server" in result.stderr
    assert "Traceback" not in result.stderr
