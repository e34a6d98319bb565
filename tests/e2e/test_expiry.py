"""Expiry as OpenAI defines it, over HTTP with the official SDK against a real server whose
retention pass runs every half second and which (a test setting) accepts expiries under an
hour: an upload's ``expires_after`` sets its ``expires_at`` and the file is gone after it; a
batch's ``output_expires_after`` does the same for its output and error files; a running
batch's input outlives its ``expires_at``; malformed or out-of-range policies are 400s naming
the field."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.helpers import chat_line, eventually, file_gone, jsonl, wait_for
from tests.support.serverproc import running_server

KEY = "expiry-key-01"
LONG_BATCH_REQUESTS = 300


def expiring(seconds: int) -> dict[str, object]:
    return {"anchor": "created_at", "seconds": seconds}


def test_files_and_result_files_expire_as_asked_and_a_running_batch_keeps_its_input(
    tmp_path: Path,
) -> None:
    with running_server(
        tmp_path,
        BATCHD_API_KEYS=KEY,
        BATCHD_RETENTION_INTERVAL_SECONDS="0.5",
        BATCHD_MIN_EXPIRES_AFTER_SECONDS="1",
    ) as server:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key=KEY, max_retries=0)

        # A small batch whose result files expire 3 s after they are written.
        small_input = client.files.create(
            file=("small.jsonl", jsonl([chat_line(f"s{i}", "Hi", max_tokens=2) for i in range(2)])),
            purpose="batch",
        )
        assert small_input.expires_at == small_input.created_at + 30 * 24 * 3600  # the default
        small = client.batches.create(
            input_file_id=small_input.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            output_expires_after={"anchor": "created_at", "seconds": 3},
        )
        # A batch that runs throughout, whose input expires 2 s after upload.
        long_lines = [
            chat_line(f"l{i}", f"Tell a story about {i}.", max_tokens=8)
            for i in range(LONG_BATCH_REQUESTS)
        ]
        long_input = client.files.create(
            file=("long.jsonl", jsonl(long_lines)), purpose="batch", expires_after=expiring(2)
        )
        assert long_input.expires_at == long_input.created_at + 2
        long = client.batches.create(
            input_file_id=long_input.id, endpoint="/v1/chat/completions", completion_window="48h"
        )

        small_done = wait_for(client, small.id)
        assert small_done.status == "completed"
        output = client.files.retrieve(small_done.output_file_id)
        assert output.expires_at == output.created_at + 3

        # A file nothing reads, with the long input's expiry, uploaded after it: its going means
        # a retention pass ran after the long batch's input expired.
        decoy = client.files.create(
            file=("decoy.jsonl", b'{"custom_id": "d"}\n'),
            purpose="user_data",
            expires_after=expiring(2),
        )
        assert decoy.expires_at == decoy.created_at + 2
        eventually(lambda: file_gone(client, decoy.id), "the decoy expires")
        with pytest.raises(openai.NotFoundError):
            client.files.content(decoy.id)
        assert decoy.id not in [f.id for f in client.files.list()]

        # The running batch's input is past its expires_at and still there.
        assert client.files.retrieve(long_input.id).expires_at < time.time()
        assert client.batches.retrieve(long.id).status == "in_progress", (
            "the long batch ended before the check; make it longer"
        )
        # The small batch's output expired 3 s after it was written; its input has not.
        eventually(lambda: file_gone(client, output.id), "the small batch's output expires")
        assert client.files.retrieve(small_input.id).id == small_input.id

        # Once the long batch has ended, its input goes.
        client.batches.cancel(long.id)
        assert wait_for(client, long.id).status == "cancelled"
        eventually(lambda: file_gone(client, long_input.id), "the long batch's input expires")

        _refusals(client, server.openai_base_url)


def _refusals(client: openai.OpenAI, base_url: str) -> None:
    """Malformed or out-of-range policies: 400s in OpenAI's shape naming the field."""
    for policy, param in (
        (expiring(0), "expires_after[seconds]"),
        (expiring(2_592_001), "expires_after[seconds]"),
        ({"anchor": "last_active_at", "seconds": 3600}, "expires_after[anchor]"),
        ({"anchor": "created_at"}, "expires_after[seconds]"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.files.create(
                file=("x.jsonl", b'{"custom_id": "x"}\n'),
                purpose="batch",
                expires_after=policy,  # type: ignore[arg-type]
            )
        assert refused.value.body["param"] == param, refused.value.body  # type: ignore[index]
    # Not a number, sent by hand as the SDK would send a number.
    answer = httpx.post(
        f"{base_url}/files",
        headers={"Authorization": f"Bearer {KEY}"},
        data={
            "purpose": "batch",
            "expires_after[anchor]": "created_at",
            "expires_after[seconds]": "soon",
        },
        files={"file": ("x.jsonl", b'{"custom_id": "x"}\n')},
        timeout=30,
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "expires_after[seconds]", answer.text
    assert [f.filename for f in client.files.list()].count("x.jsonl") == 0

    file_id = client.files.create(
        file=("in.jsonl", jsonl([chat_line("a", "Hi")])), purpose="batch"
    ).id
    for body_policy, param in (
        (expiring(2_592_001), "output_expires_after.seconds"),
        ({"anchor": "created_at", "seconds": "3600"}, "output_expires_after.seconds"),
        ({"anchor": "expires_at", "seconds": 3600}, "output_expires_after.anchor"),
        ("30d", "output_expires_after"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.batches.create(
                input_file_id=file_id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                output_expires_after=body_policy,  # type: ignore[arg-type]
            )
        assert refused.value.body["param"] == param, refused.value.body  # type: ignore[index]
