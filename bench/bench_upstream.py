"""batchd in front of an upstream OpenAI-compatible server (llama-cpp-python's own, on the
bundled model), measured side by side in one run:

1. the same N chat requests sent one at a time by a naive client straight to the upstream, vs
   sent as one batch through batchd (upload to downloaded results);
2. with the upstream limited to C concurrent requests (``max_concurrency = C``), the
   concurrency a proxy in front of the upstream actually sees over the batch, time-weighted:
   utilisation = achieved / C (1.0: the upstream was never left below its limit).

llama-cpp-python's server runs one request at a time, so (1) measures what batchd costs or
saves around a serial upstream, not batching gains; a vLLM/SGLang upstream would turn the held
concurrency of (2) into throughput.

    .venv/bin/python bench/bench_upstream.py [--n 32] [--max-tokens 16] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' helpers

from tests.support.faultproxy import FaultProxy
from tests.support.upstreamproc import UPSTREAM_MODEL, llama_server

from _harness import append_record, machine, run_batch, server, small_chat_workload


def naive_sequential(base_url: str, bodies: list[dict[str, Any]]) -> tuple[float, int]:
    """One request after another, straight to the upstream: (seconds, completion tokens)."""
    tokens = 0
    with httpx.Client(timeout=600) as client:
        start = time.perf_counter()
        for body in bodies:
            response = client.post(
                f"{base_url}/v1/chat/completions", json={**body, "model": UPSTREAM_MODEL}
            )
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]
        return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    bodies = [{**b, "model": "upstream"} for b in small_chat_workload(args.n, args.max_tokens)]
    report: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        report.append(line)

    print(f"machine: {machine()}", flush=True)
    with (
        tempfile.TemporaryDirectory(prefix="bench-upstream-") as tmp,
        llama_server(Path(tmp), n_threads=2) as upstream,
    ):
        proxy = FaultProxy(upstream).start()
        try:
            config = Path(tmp) / "batchd.toml"
            config.write_text(
                f'[models.upstream]\nengine = "openai-http"\n'
                f'base_url = "{proxy.url}/v1"\nupstream_model = "{UPSTREAM_MODEL}"\n'
                f"max_concurrency = {args.concurrency}\n"
            )
            naive_sequential(upstream, bodies[:2])  # warm the upstream
            seq_seconds, seq_tokens = naive_sequential(upstream, bodies)
            with server(BATCHD_CONFIG=str(config)) as srv:
                proxy.reset_stats()
                batch = run_batch(srv.client(), bodies)
            achieved = proxy.mean_inflight()
            peak = proxy.max_inflight
            sent = len(proxy.seen)
        finally:
            proxy.stop()
    say(
        f"upstream: llama-cpp-python server, bundled SmolLM2-135M, 2 threads; "
        f"{args.n} chat requests x {args.max_tokens} tokens (greedy)"
    )
    say(
        f"   naive client, one at a time, direct: {seq_seconds:.1f} s "
        f"({seq_tokens / seq_seconds:.0f} tok/s)"
    )
    say(
        f"   one batch through batchd (upload to results): {batch['seconds']:.1f} s "
        f"({batch['completion_tokens'] / batch['seconds']:.0f} tok/s); "
        f"ratio sequential/batch = {seq_seconds / batch['seconds']:.2f}"
    )
    say(
        f"   upstream limited to C={args.concurrency}: achieved concurrency at the proxy "
        f"{achieved:.2f} (peak {peak}, {sent} requests), utilisation = {achieved / args.concurrency:.2f}"
    )
    if not args.no_record:
        command = (
            f"python bench/bench_upstream.py --n {args.n} --max-tokens {args.max_tokens}"
            f" --concurrency {args.concurrency}"
        )
        append_record(command, report, "upstream engine")


if __name__ == "__main__":
    main()
