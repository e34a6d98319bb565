"""What polling a big running batch costs the server: CPU per retrieve and per list while a
batch of --n requests (OpenAI's maximum, 50,000, by default) is in progress, with the request
counts recounted on every read vs shared by pollers for up to 1 s
(``BATCHD_BATCH_COUNTS_MAX_AGE_SECONDS``, default 1), measured side by side in one run.

Each arm is its own ``batchd serve`` (SQLite, temp data dir) on the fake engine slowed to one
token per 5 s, so the batch stays in progress while --clients keep-alive clients (the minimal
HTTP/1.1 client of bench/load.py) send --requests retrieves, then the same number of lists, as
fast as the server answers. Server CPU is read from /proc before and after each phase.

    .venv/bin/python bench/bench_poll_cost.py [--n 50000] [--clients 20] [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from _harness import bench_parser, report_and_record, server
from load import KeepAliveConnection

API_KEY = "bench"  # the bench server runs without keys


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def hammer(url: str, path: str, clients: int, requests: int) -> None:
    """``requests`` GETs of ``path`` spread over ``clients`` concurrent connections."""
    remaining = [requests]

    async def one_client() -> None:
        connection = KeepAliveConnection(url, API_KEY)
        try:
            while remaining[0] > 0:
                remaining[0] -= 1
                status = await connection.get(path)
                if status != 200:
                    raise RuntimeError(f"GET {path} answered {status}")
        finally:
            await connection.close()

    await asyncio.gather(*(one_client() for _ in range(clients)))


def measure_arm(args: argparse.Namespace, max_age: str) -> dict[str, float]:
    env = {
        "BATCHD_ENGINE": "fake",
        "BATCHD_FAKE_STEP_SECONDS": "5",
        "BATCHD_MAX_SEQS": "4",
        "BATCHD_BATCH_COUNTS_MAX_AGE_SECONDS": max_age,
    }
    with server(**env) as srv:
        client = srv.client()
        body = {
            "model": "default",
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 4,
        }
        lines = "\n".join(
            json.dumps(
                {
                    "custom_id": f"r{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": body,
                }
            )
            for i in range(args.n)
        )
        upload = client.files.create(file=("in.jsonl", lines.encode()), purpose="batch")
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 600
        while client.batches.retrieve(batch.id).status != "in_progress":
            if time.monotonic() > deadline:
                raise RuntimeError("the batch never started")
            time.sleep(0.5)
        figures: dict[str, float] = {}
        for name, path in (("retrieve", f"/v1/batches/{batch.id}"), ("list", "/v1/batches")):
            cpu_before, started = process_cpu_seconds(srv.proc.pid), time.monotonic()
            asyncio.run(hammer(srv.url, path, args.clients, args.requests))
            elapsed = time.monotonic() - started
            cpu = process_cpu_seconds(srv.proc.pid) - cpu_before
            figures[f"{name}_cpu_ms"] = cpu / args.requests * 1000
            figures[f"{name}_rate"] = args.requests / elapsed
        final = client.batches.retrieve(batch.id)
        if final.status != "in_progress":
            raise RuntimeError(f"the batch left in_progress ({final.status}): figures invalid")
        return figures


def main() -> None:
    parser = bench_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000, help="requests in the running batch")
    parser.add_argument("--clients", type=int, default=20, help="concurrent polling clients")
    parser.add_argument("--requests", type=int, default=3000, help="GETs per phase")
    args = parser.parse_args()

    recount = measure_arm(args, "0")
    shared = measure_arm(args, "1")
    report = [
        f"polling a running batch of {args.n} requests: {args.clients} keep-alive clients,"
        f" {args.requests} retrieves then {args.requests} lists (SQLite, one process)",
    ]
    for label, arm in (("recount every read", recount), ("shared for 1 s    ", shared)):
        report.append(
            f"   {label}: retrieve {arm['retrieve_cpu_ms']:.2f} ms CPU/request"
            f" ({arm['retrieve_rate']:.0f}/s); list {arm['list_cpu_ms']:.2f} ms CPU/request"
            f" ({arm['list_rate']:.0f}/s)"
        )
    report.append(
        f"   ratio recount/shared, server CPU per request: retrieve"
        f" {recount['retrieve_cpu_ms'] / shared['retrieve_cpu_ms']:.1f}x,"
        f" list {recount['list_cpu_ms'] / shared['list_cpu_ms']:.1f}x"
    )
    report_and_record(report, args, "bench_poll_cost.py", "polling cost of a big running batch")


if __name__ == "__main__":
    main()
