"""PostgreSQL as the store: the same Alembic migrations as SQLite (on an empty database and on
one holding data), ``batchd db upgrade``, and the real server running OpenAI and Anthropic
batches with the official SDKs on a fresh PostgreSQL database, surviving a restart."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import anthropic
import openai
from sqlalchemy import create_engine, inspect, text

from batchd.store import database
from tests.support.helpers import chat_line, read_jsonl, upload, wait_for
from tests.support.serverproc import running_server

KEY = "pg-key-000001"


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return str(ScriptDirectory.from_config(database.alembic_config()).get_current_head())


class ConnectionWatcher:
    """Samples, in a thread, how many other sessions are connected to one database, and keeps
    the most seen."""

    def __init__(self, url: str) -> None:
        self._engine = create_engine(url)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self.most = 0

    def _watch(self) -> None:
        query = text(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        with self._engine.connect() as conn:
            while not self._stop.wait(0.05):
                self.most = max(self.most, int(conn.execute(query).scalar_one()))
                conn.rollback()  # a fresh snapshot of pg_stat_activity next time

    def __enter__(self) -> ConnectionWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._engine.dispose()


def test_migrations_upgrade_an_empty_database(postgres_url: str) -> None:
    engine = database.open_url(postgres_url)
    assert database.current_revision(engine) is None
    database.upgrade(engine)
    assert database.current_revision(engine) == head_revision()
    tables = set(inspect(engine).get_table_names())
    assert {"files", "batches", "requests", "idempotency_keys"} <= tables
    database.upgrade(engine)  # a second run (another process starting) changes nothing
    engine.dispose()


def test_migrations_upgrade_a_database_holding_data(postgres_url: str) -> None:
    engine = database.open_url(postgres_url)
    database.upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO batches (id, tenant, surface, endpoint, input_file_id,"
                " completion_window, status, created_at, expires_at)"
                " VALUES ('batch_old', 't', 'openai', '/v1/chat/completions', 'file-old',"
                " '24h', 'in_progress', 1, 2)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO requests (batch_id, line_no, custom_id, body, prefix_key, state,"
                " attempts, lease_epoch) VALUES ('batch_old', 1, 'c1', :body, 'k', 'pending',"
                " 0, 0)"
            ),
            {"body": b'{"model": "default"}'},
        )
    database.upgrade(engine)
    with engine.connect() as conn:
        batch = conn.execute(text("SELECT * FROM batches WHERE id = 'batch_old'")).mappings().one()
        row = conn.execute(text("SELECT * FROM requests")).mappings().one()
    assert batch["status"] == "in_progress" and batch["archived_at"] is None
    assert row["custom_id"] == "c1" and bytes(row["body"]) == b'{"model": "default"}'
    assert database.current_revision(engine) == head_revision()
    engine.dispose()


def test_db_upgrade_command(postgres_url: str, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "batchd.cli", "db", "upgrade", "--database-url"]
    done = subprocess.run(
        [*command, postgres_url], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert f"revision {head_revision()}" in done.stdout and "was empty" in done.stdout
    again = subprocess.run(
        [*command, postgres_url], capture_output=True, text=True, timeout=120, check=False
    )
    assert f"was {head_revision()}" in again.stdout
    bad = subprocess.run(
        [*command, "mysql://x@y/z"], capture_output=True, text=True, timeout=120, check=False
    )
    assert bad.returncode == 2 and "unsupported database" in bad.stderr


def test_server_on_postgres_runs_both_surfaces_and_survives_a_restart(
    postgres_url: str,
    tmp_path: Path,
) -> None:
    env = {"BATCHD_DATABASE_URL": postgres_url, "BATCHD_API_KEYS": KEY}
    # The first server runs on a pool of 2 connections and no overflow: the setting must bound
    # what the process holds, and API, scheduler and retention must all get by with 2.
    small_pool = {"BATCHD_DATABASE_POOL_SIZE": "2", "BATCHD_DATABASE_MAX_OVERFLOW": "0"}
    watcher = ConnectionWatcher(postgres_url)
    with watcher, running_server(tmp_path / "data", **env, **small_pool) as server:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key=KEY, max_retries=0)
        lines = [chat_line(f"r{i}", f"Say {i}.", max_tokens=3) for i in range(6)]
        lines.append(chat_line("bad", "Hi", max_tokens=3, model="no-such-model"))
        batch = client.batches.create(
            input_file_id=upload(client, lines),
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"db": "postgres"},
        )
        claude = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)
        params = {
            "model": "default",
            "max_tokens": 3,
            "messages": [{"role": "user", "content": "Hi"}],
        }
        message_batch = claude.messages.batches.create(
            requests=[{"custom_id": f"m{i}", "params": params} for i in range(3)]  # type: ignore[misc]
        )
        done = wait_for(client, batch.id)
        assert done.status == "completed"
        assert (done.request_counts.completed, done.request_counts.failed) == (6, 1)
        outputs = read_jsonl(client, done.output_file_id)
        assert sorted(r["custom_id"] for r in outputs) == [f"r{i}" for i in range(6)]
        assert [r["custom_id"] for r in read_jsonl(client, done.error_file_id)] == ["bad"]
        deadline = time.monotonic() + 120
        while claude.messages.batches.retrieve(message_batch.id).processing_status != "ended":
            assert time.monotonic() < deadline
            time.sleep(0.3)
        results = {
            r.custom_id: r.result.type for r in claude.messages.batches.results(message_batch.id)
        }
        assert results == {"m0": "succeeded", "m1": "succeeded", "m2": "succeeded"}
    assert 1 <= watcher.most <= 2, watcher.most
    # Nothing of it lives in the data dir's SQLite file: it is all in PostgreSQL.
    assert not (tmp_path / "data" / "batchd.sqlite3").exists()
    with running_server(tmp_path / "data2", **env) as server:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key=KEY, max_retries=0)
        again = client.batches.retrieve(batch.id)
        assert again.status == "completed" and again.metadata == {"db": "postgres"}
        assert [b.id for b in client.batches.list().data] == [batch.id]
    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        states = dict(
            conn.execute(text("SELECT state, count(*) FROM requests GROUP BY state")).all()
        )
    engine.dispose()
    assert states == {"succeeded": 9, "errored": 1}
