"""File bytes in S3-compatible object storage (BATCHD_FILES_URL=s3://bucket/prefix).

The object store is moto's S3 server (``python -m moto.server``), run as its own process and
spoken to over real HTTP by boto3, as batchd would speak to MinIO or AWS; it is an in-memory
implementation of the S3 API, not AWS itself. One test runs ``batchd serve`` on it; another
runs an API replica and a worker on PostgreSQL with *separate* data dirs, so the bucket is
the only place they share file bytes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import openai
import pytest

from tests.support.helpers import chat_line, read_jsonl, upload, wait_for
from tests.support.procs import Proc, wait_healthy
from tests.support.serverproc import free_port, running_server

BUCKET = "batchd-files"
PREFIX = "team-a"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "test-access-key",
    "AWS_SECRET_ACCESS_KEY": "test-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture()
def s3_endpoint(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "moto.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **AWS_ENV},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(url, timeout=1)
                break
            assert proc.poll() is None, (tmp_path / "moto.log").read_text()
            assert time.monotonic() < deadline, "moto's S3 server did not start"
            time.sleep(0.2)
        bucket_client(url).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def bucket_client(endpoint: str):  # type: ignore[no-untyped-def]
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=AWS_ENV["AWS_DEFAULT_REGION"],
    )


def objects(endpoint: str) -> dict[str, bytes]:
    s3 = bucket_client(endpoint)
    listed = s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listed}


def s3_env(endpoint: str) -> dict[str, str]:
    return {
        **AWS_ENV,
        "BATCHD_FILES_URL": f"s3://{BUCKET}/{PREFIX}",
        "BATCHD_S3_ENDPOINT_URL": endpoint,
    }


def test_serve_keeps_every_file_in_the_bucket(s3_endpoint: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with running_server(data_dir, **s3_env(s3_endpoint)) as server:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0)
        lines = [chat_line(f"s{i}", f"Say {i}.", max_tokens=3) for i in range(4)]
        lines.append(chat_line("bad", "Hi.", model="no-such-model"))
        file_id = upload(client, lines)
        # The upload is an object under the prefix, byte for byte; nothing on local disk.
        stored = objects(s3_endpoint)
        assert len(stored) == 1 and next(iter(stored)).startswith(f"{PREFIX}/")
        assert client.files.content(file_id).content == next(iter(stored.values()))
        assert not any((data_dir / "files").glob("*"))

        batch = client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = wait_for(client, batch.id)
        assert done.status == "completed", done
        output = read_jsonl(client, done.output_file_id)
        errors = read_jsonl(client, done.error_file_id)
        assert sorted(r["custom_id"] for r in output) == [f"s{i}" for i in range(4)]
        assert [r["custom_id"] for r in errors] == ["bad"]
        assert errors[0]["response"]["status_code"] == 404
        assert len(objects(s3_endpoint)) == 3  # input, output and error files

        client.files.delete(file_id)
        assert len(objects(s3_endpoint)) == 2  # the input's object went with it
        with pytest.raises(openai.NotFoundError):
            client.files.content(file_id)
        assert not any((data_dir / "files").glob("*"))


def test_a_missing_bucket_stops_start_up_naming_it(s3_endpoint: str, tmp_path: Path) -> None:
    env = {**os.environ, **s3_env(s3_endpoint), "BATCHD_FILES_URL": "s3://no-such-bucket/x"}
    result = subprocess.run(
        [sys.executable, "-m", "batchd.cli", "serve", "--port", str(free_port())],
        env={**env, "BATCHD_DATA_DIR": str(tmp_path / "d")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "no-such-bucket" in result.stderr + result.stdout


@pytest.mark.slow
def test_api_and_worker_share_only_the_database_and_the_bucket(
    s3_endpoint: str,
    postgres_url: str,
    tmp_path: Path,
) -> None:
    common = {
        **s3_env(s3_endpoint),
        "BATCHD_DATABASE_URL": postgres_url,
        "BATCHD_API_KEYS": "s3-key",
        "BATCHD_POLL_INTERVAL_SECONDS": "0.2",
        "BATCHD_MAX_SEQS": "4",
        "BATCHD_CTX_SIZE": "2048",
        "BATCHD_N_THREADS": "1",
    }
    port = free_port()
    api = Proc(
        ["api", "--port", str(port)],
        {**common, "BATCHD_DATA_DIR": str(tmp_path / "api-data")},
        tmp_path / "api.log",
    ).start()
    worker = Proc(
        ["worker"],
        {**common, "BATCHD_DATA_DIR": str(tmp_path / "worker-data")},
        tmp_path / "worker.log",
    ).start()
    try:
        wait_healthy(api, port)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="s3-key", max_retries=0
        )
        lines = [chat_line(f"w{i}", f"Name a color, {i}.", max_tokens=3) for i in range(3)]
        batch = client.batches.create(
            input_file_id=upload(client, lines),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        done = wait_for(client, batch.id, timeout=300)
        assert done.status == "completed", (done, worker.tail())
        # The worker read the upload from the bucket and wrote the output there; the API
        # replica serves it from the bucket.
        output = read_jsonl(client, done.output_file_id)
        assert sorted(r["custom_id"] for r in output) == ["w0", "w1", "w2"]
        for data_dir in (tmp_path / "api-data", tmp_path / "worker-data"):
            assert not any((data_dir / "files").glob("*")), data_dir
    finally:
        worker.stop()
        api.stop()
