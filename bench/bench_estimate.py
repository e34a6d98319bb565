"""Estimates before submitting against what the batches then took.

One server on the default settings. A first batch (64 chat requests x 32 tokens) runs so the
deployment has a measured throughput. Then, for each shape below: `POST /v1/batches/estimate`
with the file, then the same file submitted as a batch and timed from its create to its
completion (polled every 0.25 s). The last shape is estimated while another batch runs ahead
of it, so the queue ahead counts. Printed side by side: estimated and actual seconds and
their ratio, estimated and actual cost at batch prices.

Run: .venv/bin/python bench/bench_estimate.py
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai

from _harness import TOPICS, bench_parser, chat_body, report_and_record, server, small_chat_workload

LONG_TEXT = (
    "The history of the lighthouse at the edge of the harbour began with a fire on a stone"
    " tower, kept by a family who lived beside it for three generations. "
)


def lines_of(bodies: list[dict[str, Any]]) -> bytes:
    return "\n".join(
        json.dumps(
            {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": b}
        )
        for i, b in enumerate(bodies)
    ).encode()


def long_prompts(n: int, max_tokens: int) -> list[dict[str, Any]]:
    """~250 prompt tokens each, distinct from the first words on (little prefix shared)."""
    return [
        chat_body(
            f"Note {i} on {TOPICS[i % len(TOPICS)]}: " + LONG_TEXT * 5 + " Summarise it.",
            max_tokens,
        )
        for i in range(n)
    ]


def estimate(url: str, data: bytes) -> dict[str, Any]:
    response = httpx.post(
        url + "/v1/batches/estimate",
        content=data,
        headers={"authorization": "Bearer bench", "content-type": "application/jsonl"},
        timeout=600,
    )
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def submit(client: openai.OpenAI, data: bytes) -> tuple[str, float]:
    started = time.perf_counter()
    file = client.files.create(file=("bench.jsonl", data), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return batch.id, started


def wait(client: openai.OpenAI, batch_id: str) -> Any:
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            assert batch.status == "completed", batch
            return batch
        time.sleep(0.25)


def main() -> None:
    args = bench_parser(__doc__).parse_args()
    shapes = [
        ("32 chat x 16 tokens", lines_of(small_chat_workload(32, 16))),
        ("128 chat x 32 tokens", lines_of(small_chat_workload(128, 32))),
        ("48 long prompts x 24 tokens", lines_of(long_prompts(48, 24))),
    ]
    report = [
        "estimated vs actual time and cost (one server, default settings; after a first batch"
        " of 64 x 32 tokens measured the throughput)"
    ]
    with server() as srv:
        client = srv.client()
        warm_id, _ = submit(client, lines_of(small_chat_workload(64, 32)))
        wait(client, warm_id)
        rows = []
        for name, data in shapes:
            guess = estimate(srv.url, data)
            batch_id, started = submit(client, data)
            done = wait(client, batch_id)
            rows.append((name, guess, time.perf_counter() - started, done))
        # Queued: a batch estimated while another runs ahead of it.
        ahead_id, _ = submit(client, lines_of(small_chat_workload(96, 32)))
        time.sleep(1.0)
        data = lines_of(small_chat_workload(32, 16))
        guess = estimate(srv.url, data)
        batch_id, started = submit(client, data)
        done = wait(client, batch_id)
        rows.append(("32 chat x 16 behind 96 x 32", guess, time.perf_counter() - started, done))
        wait(client, ahead_id)
    for name, guess, actual, done in rows:
        timing = guess["time"]
        estimated = timing["seconds"]
        cost = (done.model_extra or {})["batchd"]["cost"]
        report.append(
            f"   {name}: estimated {estimated:.1f} s, actual {actual:.1f} s,"
            f" ratio {estimated / actual:.2f};"
            f" prompt tokens {guess['input_tokens']} estimated ({guess['cached_tokens_expected']}"
            f" shared), {done.usage.input_tokens} actual ({done.usage.input_tokens_details.cached_tokens}"
            f" cached); output {guess['output_tokens']['expected']} estimated,"
            f" {done.usage.output_tokens} actual;"
            f" cost {guess['cost']['batch']:.6f} estimated, {cost['batch']:.6f} actual"
            f" ({timing['queue_ahead_requests']} requests ahead,"
            f" {timing['throughput_tokens_per_second']:.0f} tokens/s measured)"
        )
    report_and_record(report, args, "bench_estimate.py", "estimates vs actual")


if __name__ == "__main__":
    main()
