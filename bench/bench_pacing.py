"""What loop pacing (src/batchd/loop_pacing.py, BATCHD_LOOP_PACING_MS) costs when nothing is
polling: a batch alone, and realtime requests beside a running batch, with pacing on and off.

bench/load.py measures what pacing is for (200 pollers beside a batch); this measures its
price. Two servers (bundled model, embedded engine), one with BATCHD_LOOP_PACING_MS=20 and one
with 0, started in turn for --rounds rounds (the order alternates by round, so that a drift of
the machine favours neither). In each: --batches batches of --n chat requests, each timed from
create to the poll that sees it completed (the submitter polls every 50 ms, as in load.py);
then --realtime streamed chat requests sent one after another while a batch runs, TTFT and
total time of each; then one upload of a 50,000-line file (~53 MB) while a batch runs.

Run: .venv/bin/python bench/bench_pacing.py [--rounds 3] [--n 64] [--batches 2]
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from typing import Any

import openai

from _harness import (
    bench_parser,
    chat_body,
    machine,
    percentile,
    report_and_record,
    server,
    small_chat_workload,
)
from load import run_batch

ARMS = {"paced (20 ms)": "20", "unpaced (0)": "0"}


def realtime_beside_a_batch(
    client: openai.OpenAI, background: list[dict[str, Any]], count: int, max_tokens: int
) -> tuple[list[float], list[float]]:
    """TTFT and total seconds of ``count`` streamed requests while ``background`` runs."""
    worker = threading.Thread(target=run_batch, args=(client, background, None, []))
    worker.start()
    time.sleep(3)  # the batch fills the engine
    ttft, total = [], []
    for i in range(count):
        body = chat_body(f"Quick question {i}: name a colour of the sky.", max_tokens)
        start = time.perf_counter()
        first = None
        for chunk in client.chat.completions.create(**body, stream=True):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
        total.append(time.perf_counter() - start)
        ttft.append(first if first is not None else total[-1])
        time.sleep(0.2)
    worker.join()
    return ttft, total


def upload_beside_a_batch(
    client: openai.OpenAI, background: list[dict[str, Any]], data: bytes
) -> float:
    """Seconds to upload ``data`` (POST /v1/files) while ``background`` runs."""
    worker = threading.Thread(target=run_batch, args=(client, background, None, []))
    worker.start()
    time.sleep(3)
    start = time.perf_counter()
    client.files.create(file=("big.jsonl", data), purpose="batch")
    seconds = time.perf_counter() - start
    worker.join()
    return seconds


def big_file(lines: int) -> bytes:
    body = {"model": "default", "messages": [{"role": "user", "content": "a" * 900}]}
    return "\n".join(
        json.dumps(
            {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        )
        for i in range(lines)
    ).encode()


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=64, help="chat requests per batch")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--batches", type=int, default=2, help="timed batches per arm and round")
    parser.add_argument("--realtime", type=int, default=10, help="streamed requests per round")
    args = parser.parse_args()

    print(f"machine: {machine()}", flush=True)
    bodies = small_chat_workload(args.n, args.max_tokens)
    background = small_chat_workload(256, 64)
    rates: dict[str, list[float]] = {arm: [] for arm in ARMS}
    ttfts: dict[str, list[float]] = {arm: [] for arm in ARMS}
    totals: dict[str, list[float]] = {arm: [] for arm in ARMS}
    uploads: dict[str, list[float]] = {arm: [] for arm in ARMS}
    data = big_file(50_000)
    for round_no in range(1, args.rounds + 1):
        order = list(ARMS) if round_no % 2 else list(reversed(ARMS))
        for arm in order:
            with server(BATCHD_LOOP_PACING_MS=ARMS[arm]) as srv:
                client = srv.client()
                run_batch(client, bodies[:16], None, [])  # warm-up
                for _ in range(args.batches):
                    _, tokens, seconds = run_batch(client, bodies, None, [])
                    rates[arm].append(tokens / seconds)
                ttft, total = realtime_beside_a_batch(client, background, args.realtime, 32)
                ttfts[arm].extend(ttft)
                totals[arm].extend(total)
                uploads[arm].append(upload_beside_a_batch(client, background, data))
            print(
                f"   round {round_no} {arm}: batch alone"
                f" {statistics.mean(rates[arm][-args.batches :]):.0f} tok/s",
                flush=True,
            )

    def ms(values: list[float], q: float) -> str:
        return f"{percentile(values, q) * 1000:.0f} ms"

    paced, unpaced = ARMS
    report = [
        f"loop pacing on and off, nothing polling: {args.rounds} rounds, {args.batches} batches of"
        f" {args.n} chat requests x {args.max_tokens} tokens per arm and round; {args.realtime}"
        " streamed requests (max_tokens 32) and one upload per round beside a batch of 256 x 64",
    ]
    for arm in ARMS:
        report.append(
            f"   {arm:14} batch alone {statistics.mean(rates[arm]):.0f} tok/s; realtime beside a"
            f" batch: TTFT p50 {ms(ttfts[arm], 50)} p95 {ms(ttfts[arm], 95)}, total p50"
            f" {ms(totals[arm], 50)} p95 {ms(totals[arm], 95)}; upload of"
            f" {len(data) / 1e6:.0f} MB beside a batch {statistics.mean(uploads[arm]):.2f} s"
        )
    report.append(
        f"   ratio paced/unpaced: batch alone"
        f" {statistics.mean(rates[paced]) / statistics.mean(rates[unpaced]):.2f}; realtime total"
        f" p50 {percentile(totals[paced], 50) / percentile(totals[unpaced], 50):.2f}x, p95"
        f" {percentile(totals[paced], 95) / percentile(totals[unpaced], 95):.2f}x"
    )
    report_and_record(report, args, "bench_pacing.py", "loop pacing, nothing polling")


if __name__ == "__main__":
    main()
