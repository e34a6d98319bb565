"""The user CLI (`batchd submit | status | results | cancel | ls`) against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai

from tests.support.helpers import API_KEY, chat_line, jsonl, wait_for
from tests.support.serverproc import ServerProcess, free_port


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchd.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def batchd(server_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, "--url", server_url, "--api-key", API_KEY)


def test_submit_wait_status_results_ls_cancel(server: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "questions.jsonl"
    source.write_bytes(jsonl([chat_line(f"cli-{i}", f"Say the number {i}.") for i in range(4)]))
    done = batchd(server.url, "submit", str(source), "--wait", "--metadata", "team=cli")
    assert done.returncode == 0, done.stderr
    batch_id = done.stdout.strip()  # stdout holds only the id; progress goes to stderr
    assert batch_id.startswith("batch_")
    assert "4 completed, 0 failed, 4 total" in done.stderr
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
    no_errors = batchd(server.url, "results", batch_id, "--errors")
    assert no_errors.returncode == 1 and "no error file" in no_errors.stderr

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
    result = batchd(server.url, "submit", str(source), "--wait")
    assert result.returncode == 2, result.stderr
    assert result.stdout.strip().startswith("batch_")
    assert "line 2: duplicate_custom_id" in result.stderr
    assert not (tmp_path / "dupes.output.jsonl").exists()


def test_no_wait_prints_only_the_id_and_env_vars_configure_the_client(
    server: ServerProcess, tmp_path: Path, client: openai.OpenAI
) -> None:
    source = tmp_path / "quick.jsonl"
    source.write_bytes(jsonl([chat_line("only", "Hi")]))
    env = {"BATCHD_URL": server.url, "BATCHD_API_KEY": API_KEY}
    started = run_cli("submit", str(source), "--no-wait", env=env)
    assert started.returncode == 0, started.stderr
    batch_id = started.stdout.strip()
    assert batch_id.startswith("batch_") and "\n" not in batch_id
    assert not (tmp_path / "quick.output.jsonl").exists()
    assert wait_for(client, batch_id).status == "completed"
    assert batch_id in run_cli("ls", "--limit", "5", env=env).stdout


def test_server_errors_are_one_clean_line(server: ServerProcess) -> None:
    missing = batchd(server.url, "status", "batch_doesnotexist")
    assert missing.returncode == 1
    assert "batch_doesnotexist" in missing.stderr and "404" in missing.stderr
    assert "Traceback" not in missing.stderr
    denied = run_cli("ls", "--url", server.url, "--api-key", "wrong-key")
    assert denied.returncode == 1 and "401" in denied.stderr
    assert "Traceback" not in denied.stderr


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    result = batchd(f"http://127.0.0.1:{free_port()}", "ls")
    assert result.returncode == 1
    assert "cannot reach a batchd server" in result.stderr
    assert "Traceback" not in result.stderr
