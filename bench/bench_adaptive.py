"""Adaptive concurrency toward an upstream shared with its own realtime users.

An upstream whose latency grows with load: a stand-in OpenAI server with CAPACITY requests'
worth of compute, each request taking BASE seconds alone and proportionally longer when more
than CAPACITY are in flight (processor sharing). Its own realtime user sends one request every
REALTIME_EVERY seconds straight to it and times each. A batch of BATCH requests goes through
batchd (`max_concurrency` 16) with `adaptive_concurrency` off, then on (latency target
2 x BASE). Printed side by side: the batch's throughput and the realtime user's p95.

Run: .venv/bin/python bench/bench_adaptive.py
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from _harness import append_record, free_port, machine, percentile, run_batch, server

CAPACITY = 4
BASE = 0.25
BATCH = 120
REALTIME_EVERY = 0.25


class SlowUpstream:
    """An OpenAI chat endpoint whose answers slow down past CAPACITY requests in flight."""

    def __init__(self) -> None:
        self.inflight = 0
        self.port = free_port()

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.inflight += 1
        try:
            # Processor sharing, stepwise: the request's remaining work drains at a rate of
            # CAPACITY / inflight while more than CAPACITY share the upstream.
            work = BASE
            while work > 0:
                share = min(1.0, CAPACITY / self.inflight)
                step = min(0.02, work / share)
                await asyncio.sleep(step)
                work -= step * share
        finally:
            self.inflight -= 1
        answer = {
            "id": "chatcmpl-slow",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "slow",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
        }
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    def start(self) -> None:
        config = uvicorn.Config(self.app, port=self.port, log_level="warning", interface="asgi3")
        self.server = uvicorn.Server(config)
        threading.Thread(target=self.server.run, daemon=True).start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the stand-in upstream did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True


def realtime_user(url: str, stop: threading.Event, latencies: list[float]) -> None:
    body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            started = time.perf_counter()
            client.post(f"{url}/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - started)
            stop.wait(REALTIME_EVERY)


def arm(upstream: SlowUpstream, adaptive: bool) -> tuple[float, float, float]:
    """Batch requests a second, and the realtime user's p95 and p50 latency during it."""
    with tempfile.TemporaryDirectory(prefix="batchd-adaptive-") as tmp:
        config = Path(tmp) / "batchd.toml"
        config.write_text(
            f"""
[models.slow]
engine = "openai-http"
base_url = "http://127.0.0.1:{upstream.port}/v1"
max_concurrency = 16
adaptive_concurrency = {"true" if adaptive else "false"}
latency_target_seconds = {2 * BASE}
"""
        )
        bodies = [
            {
                "model": "slow",
                "messages": [{"role": "user", "content": f"Say {i}."}],
                "max_tokens": 1,
            }
            for i in range(BATCH)
        ]
        with server(BATCHD_CONFIG=str(config)) as srv:
            latencies: list[float] = []
            stop = threading.Event()
            user = threading.Thread(
                target=realtime_user,
                args=(f"http://127.0.0.1:{upstream.port}", stop, latencies),
            )
            user.start()
            try:
                batch = run_batch(srv.client(), bodies)
            finally:
                stop.set()
                user.join()
    return BATCH / batch["seconds"], percentile(latencies, 95), percentile(latencies, 50)


def main() -> None:
    print(f"machine: {machine()}", flush=True)
    upstream = SlowUpstream()
    upstream.start()
    try:
        off = arm(upstream, adaptive=False)
        on = arm(upstream, adaptive=True)
    finally:
        upstream.stop()
    lines = [
        f"adaptive concurrency: an upstream with {CAPACITY} requests' capacity ({BASE} s each"
        f" alone), its own user sending one request every {REALTIME_EVERY} s; a batch of"
        f" {BATCH} through batchd with max_concurrency 16",
        f"   adaptive off: batch {off[0]:.1f} requests/s; the upstream's own user: p50"
        f" {off[2] * 1000:.0f} ms, p95 {off[1] * 1000:.0f} ms",
        f"   adaptive on:  batch {on[0]:.1f} requests/s; the upstream's own user: p50"
        f" {on[2] * 1000:.0f} ms, p95 {on[1] * 1000:.0f} ms (latency target"
        f" {2 * BASE * 1000:.0f} ms)",
        f"   batch throughput on/off: {on[0] / off[0]:.2f}; user p95 on/off: {on[1] / off[1]:.2f}",
    ]
    print("\n".join(lines), flush=True)
    append_record("python bench/bench_adaptive.py", lines, title="adaptive concurrency")


if __name__ == "__main__":
    main()
