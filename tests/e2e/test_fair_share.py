"""Fair share across tenants, with the real engine over real HTTP: a tenant that queued a
little is not made to wait behind one that queued a lot (store/fair_share.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.helpers import chat_line, eventually, upload, wait_for
from tests.support.serverproc import ServerProcess, running_server

BIG_KEY, SMALL_KEY = "tenant-a-key-01", "tenant-b-key-01"
BIG_BATCH = 2000
SMALL_BATCH = 20


@pytest.fixture(scope="module")
def two_tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("fair-share")
    keys = data_dir.parent / f"{data_dir.name}-keys.txt"
    keys.write_text(f"{BIG_KEY} team-a\n{SMALL_KEY} team-b\n")
    with running_server(data_dir, BATCHD_KEYS_FILE=str(keys)) as srv:
        yield srv


def client(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_base_url, api_key=key, max_retries=0)


def submit(api: openai.OpenAI, prefix: str, count: int) -> str:
    lines = [chat_line(f"{prefix}{i}", f"Say {i}.", max_tokens=2) for i in range(count)]
    file_id = upload(api, lines, name=f"{prefix}.jsonl")
    return api.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id


def test_a_small_batch_finishes_while_a_big_one_of_another_tenant_is_well_short_of_half(
    two_tenants: ServerProcess, tmp_path: Path
) -> None:
    big_api, small_api = client(two_tenants, BIG_KEY), client(two_tenants, SMALL_KEY)
    big = submit(big_api, "a", BIG_BATCH)

    def big_is_running() -> bool:
        counts = big_api.batches.retrieve(big).request_counts
        return counts is not None and counts.completed > 0

    eventually(big_is_running, "the big batch started")
    small = submit(small_api, "b", SMALL_BATCH)  # same 24h window, a later deadline
    finished = wait_for(small_api, small, timeout=300)
    done_of_big = big_api.batches.retrieve(big).request_counts
    assert finished.status == "completed"
    assert finished.request_counts is not None and finished.request_counts.completed == SMALL_BATCH
    assert done_of_big is not None
    print(f"the big batch had {done_of_big.completed} of {BIG_BATCH} done")
    assert done_of_big.completed < BIG_BATCH * 0.3, (
        f"{done_of_big.completed} of the big batch's {BIG_BATCH} rows ran before the small"
        " batch of another tenant finished"
    )
    big_api.batches.cancel(big)
    assert wait_for(big_api, big, timeout=120).status == "cancelled"
