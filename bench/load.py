"""Polling load vs engine throughput: many clients polling while a batch runs.

One server (bundled model, embedded engine, default settings), two arms measured side by
side and alternated after a warm-up batch, so that drift on the machine hits both alike:

  alone    a batch of --n chat requests; only the submitter polls it (every 50 ms)
  loaded   the same batch while --clients concurrent clients (asyncio, one keep-alive
           connection each, a minimal HTTP/1.1 client: see KeepAliveConnection) poll it: GET /v1/batches/{id} every --interval seconds, and
           GET /v1/batches instead on every --list-every'th poll

Reported: p50/p99 latency of retrieve and of list under the load (and of the lone poller's
retrieves for reference), the request rate the clients achieved, the batch's completion
tokens/s in each arm (from create to the poll that sees it completed), and the ratio
loaded/alone. The issue's target: the polling load costs the batch less than 10% of its
throughput (ratio >= 0.90). The clients run in this process, on the same cores as the server,
as they would on a single machine.

Run: .venv/bin/python bench/load.py [--clients 200] [--n 128] [--rounds 2] [--interval 1.0]
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import uvloop

from _harness import (
    bench_parser,
    machine,
    percentile,
    report_and_record,
    server,
    small_chat_workload,
)

API_KEY = "bench"  # the bench server runs without keys; any key is accepted
TERMINAL = ("completed", "failed", "expired", "cancelled")
SUBMITTER_POLL_SECONDS = 0.05


class KeepAliveConnection:
    """One keep-alive HTTP/1.1 connection that speaks just enough protocol for these GETs.

    A load generator must cost far less CPU than the server it loads, or on one machine the
    benchmark measures the client: httpx spends about as much CPU per request as the server
    does (measured), which on 2 cores is taken straight from the engine. This costs a few
    tens of microseconds."""

    def __init__(self, url: str, api_key: str) -> None:
        parsed = httpx.URL(url)
        self.host, self.port = parsed.host, parsed.port or 80
        self._auth = f"Authorization: Bearer {api_key}\r\n".encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> int:
        """The response's status; the body is read and dropped."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        try:
            self._writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n".encode() + self._auth + b"\r\n"
            )
            head = await self._reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            marker = head.lower().find(b"\r\ncontent-length:")
            if marker < 0:
                raise ValueError("a response without Content-Length")
            length = int(head[marker + 17 : head.index(b"\r\n", marker + 2)])
            await self._reader.readexactly(length)
            return status
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = self._reader = None


class PollingLoad:
    """Concurrent clients on their own event loop in a background thread."""

    def __init__(self, url: str, clients: int, interval: float, list_every: int) -> None:
        self.url = url
        self.clients = clients
        self.interval = interval
        self.list_every = list_every
        self.target = ""  # the batch id the clients retrieve; swapped while they run
        self.recording = False
        self.latencies: dict[str, list[float]] = {"retrieve": [], "list": []}
        self.errors: collections.Counter[str] = collections.Counter()  # by status or exception
        self.started = threading.Event()
        self._stopping = False
        self._ready = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, target: str) -> None:
        self.target = target
        self._thread.start()
        # Every client connected and polling before the measured window opens.
        if not self.started.wait(timeout=60 + self.interval):
            raise RuntimeError("the polling clients did not start")

    def stop(self) -> None:
        self._stopping = True
        self._thread.join(timeout=120)

    def _run(self) -> None:
        # uvloop (uvicorn's own loop, installed with it): the clients' share of the two cores
        # is taken from the engine too, and uvloop's is about half of asyncio's.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(self._main())

    async def _main(self) -> None:
        clients = [KeepAliveConnection(self.url, API_KEY) for _ in range(self.clients)]
        origin = asyncio.get_running_loop().time()
        try:
            await asyncio.gather(
                *(self._client(i, client, origin) for i, client in enumerate(clients))
            )
        finally:
            await asyncio.gather(*(client.close() for client in clients))

    async def _client(self, index: int, client: KeepAliveConnection, origin: float) -> None:
        loop = asyncio.get_running_loop()
        # A random phase within one interval, then a fixed schedule: independent pollers, each
        # at its own steady rate (a slow answer skips a slot rather than shifting the phase).
        due = origin + random.Random(index).uniform(0, self.interval)
        polls = 0
        while not self._stopping:
            await asyncio.sleep(max(0.0, due - loop.time()))
            polls += 1
            kind = "list" if polls % self.list_every == 0 else "retrieve"
            path = "/v1/batches" if kind == "list" else f"/v1/batches/{self.target}"
            start = time.perf_counter()
            try:
                status = await client.get(path)
                error = None if status == 200 else str(status)
            except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                error = type(exc).__name__
            elapsed = time.perf_counter() - start
            if polls == 1:
                self._ready += 1  # one event loop thread: no lock needed
                if self._ready == self.clients:
                    self.started.set()
            if self.recording:
                self.latencies[kind].append(elapsed)
                if error is not None:
                    self.errors[error] += 1
            now = loop.time()
            if self.interval <= 0:
                due = now  # back to back
            else:
                # The next slot; a timer may fire a little early (uvloop's have millisecond
                # resolution), so the slot just served is passed even if ``now`` is before it.
                due += self.interval
                if due <= now:
                    due += ((now - due) // self.interval + 1) * self.interval


@dataclass
class Arm:
    label: str
    tokens: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    server_cpu: float = 0.0  # core-seconds the server process used during the batches
    client_cpu: float = 0.0  # core-seconds this process (submitter and pollers) used

    def add(self, tokens: int, seconds: float, server_cpu: float, client_cpu: float) -> None:
        self.tokens.append(tokens)
        self.seconds.append(seconds)
        self.server_cpu += server_cpu
        self.client_cpu += client_cpu

    @property
    def rate(self) -> float:
        return sum(self.tokens) / sum(self.seconds) if self.seconds else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def upload(client: openai.OpenAI, bodies: list[dict[str, Any]]) -> str:
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        for i, body in enumerate(bodies)
    ]
    data = "\n".join(json.dumps(line) for line in lines).encode()
    return client.files.create(file=("load.jsonl", data), purpose="batch").id


def run_batch(
    client: openai.OpenAI,
    bodies: list[dict[str, Any]],
    load: PollingLoad | None,
    poll_latencies: list[float],
) -> tuple[str, int, float]:
    """(batch id, completion tokens, seconds from create to seen completed)."""
    file_id = upload(client, bodies)  # outside the window: we measure the engine, not uploads
    if load is not None:
        load.recording = True
    start = time.perf_counter()
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    if load is not None:
        load.target = batch.id
    while batch.status not in TERMINAL:
        time.sleep(SUBMITTER_POLL_SECONDS)
        polled = time.perf_counter()
        batch = client.batches.retrieve(batch.id)
        poll_latencies.append(time.perf_counter() - polled)
    seconds = time.perf_counter() - start
    if load is not None:
        load.recording = False
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert counts is not None and counts.completed == len(bodies), counts
    return batch.id, batch.usage.output_tokens if batch.usage else 0, seconds


def ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.1f} ms"


def cpu(core_seconds: float, arm: Arm) -> str:
    return f"{core_seconds / sum(arm.seconds):.2f}" if arm.seconds else "nan"


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--n", type=int, default=128, help="chat requests in the batch")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2, help="alone/loaded pairs")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between one client's polls"
    )
    parser.add_argument("--list-every", type=int, default=5, help="every Nth poll is a list")
    parser.add_argument(
        "--idle-seconds", type=float, default=10, help="the load alone, no batch running"
    )
    args = parser.parse_args()

    print(f"machine: {machine()}", flush=True)
    bodies = small_chat_workload(args.n, args.max_tokens)
    alone, loaded = Arm("alone"), Arm("loaded")
    lone_poller: list[float] = []
    load_stats: dict[str, list[float]] = {"retrieve": [], "list": []}
    requests_sent = 0
    errors: collections.Counter[str] = collections.Counter()
    loaded_seconds = 0.0
    with server() as srv:
        client = srv.client()
        previous, _, _ = run_batch(client, bodies[:16], None, [])  # warm-up
        pid = srv.proc.pid
        # The load on an idle engine: what the API costs by itself, latency and server CPU.
        idle = PollingLoad(srv.url, args.clients, args.interval, args.list_every)
        idle.start(target=previous)
        try:
            idle.recording, server_cpu = True, cpu_seconds(pid)
            time.sleep(args.idle_seconds)
            idle.recording, idle_cpu = False, cpu_seconds(pid) - server_cpu
        finally:
            idle.stop()
        idle_sent = sum(len(v) for v in idle.latencies.values())
        for round_no in range(1, args.rounds + 1):
            # The order alternates (alone first in odd rounds, loaded first in even ones), so
            # that a drift of the machine within a round favours neither arm.
            order = ("alone", "loaded") if round_no % 2 else ("loaded", "alone")
            for arm_name in order:
                if arm_name == "alone":
                    server_cpu, client_cpu = cpu_seconds(pid), own_cpu_seconds()
                    previous, tokens, seconds = run_batch(client, bodies, None, lone_poller)
                    alone.add(
                        tokens,
                        seconds,
                        cpu_seconds(pid) - server_cpu,
                        own_cpu_seconds() - client_cpu,
                    )
                    print(
                        f"   round {round_no} alone:  {tokens} tokens in {seconds:.1f} s",
                        flush=True,
                    )
                    continue
                load = PollingLoad(srv.url, args.clients, args.interval, args.list_every)
                load.start(target=previous)  # until the measured batch exists, poll the last one
                try:
                    server_cpu, client_cpu = cpu_seconds(pid), own_cpu_seconds()
                    previous, tokens, seconds = run_batch(client, bodies, load, [])
                    loaded.add(
                        tokens,
                        seconds,
                        cpu_seconds(pid) - server_cpu,
                        own_cpu_seconds() - client_cpu,
                    )
                finally:
                    load.stop()
                loaded_seconds += seconds
                for kind, values in load.latencies.items():
                    load_stats[kind].extend(values)
                sent = sum(len(v) for v in load.latencies.values())
                requests_sent += sent
                errors.update(load.errors)
                print(
                    f"   round {round_no} loaded: {tokens} tokens in {seconds:.1f} s"
                    f" ({sent} polls, errors: {dict(load.errors)})",
                    flush=True,
                )

    ratio = loaded.rate / alone.rate
    # Each round's own ratio: the machine's speed drifts between rounds (by 10% and more on
    # a shared VM), and within one round both arms see about the same machine.
    round_ratios = [
        (lt / ls) / (at / as_)
        for lt, ls, at, as_ in zip(
            loaded.tokens, loaded.seconds, alone.tokens, alone.seconds, strict=True
        )
    ]
    retrieve, listing = load_stats["retrieve"], load_stats["list"]
    report = [
        f"polling load: {args.clients} clients, each GET /v1/batches/{{id}} every"
        f" {args.interval:g} s, GET /v1/batches on every {args.list_every}th poll; batch of"
        f" {args.n} chat requests x {args.max_tokens} tokens (greedy), {args.rounds} rounds",
        f"   load: {requests_sent} requests at {requests_sent / loaded_seconds:.0f} req/s"
        f" during the loaded batches, errors: {dict(errors) or 'none'}",
        f"   same load, no batch running ({args.idle_seconds:g} s): retrieve p50"
        f" {ms(idle.latencies['retrieve'], 50)}, p99 {ms(idle.latencies['retrieve'], 99)}; list"
        f" p50 {ms(idle.latencies['list'], 50)}, p99 {ms(idle.latencies['list'], 99)}; server"
        f" CPU {idle_cpu / max(idle_sent, 1) * 1000:.2f} ms per request,"
        f" {idle_cpu / args.idle_seconds:.2f} cores; errors: {dict(idle.errors) or 'none'}",
        f"   retrieve under load: p50 {ms(retrieve, 50)}, p99 {ms(retrieve, 99)}"
        f" ({len(retrieve)} requests); lone poller without load: p50 {ms(lone_poller, 50)},"
        f" p99 {ms(lone_poller, 99)}",
        f"   list under load:     p50 {ms(listing, 50)}, p99 {ms(listing, 99)}"
        f" ({len(listing)} requests)",
        f"   batch alone:  {sum(alone.tokens)} tokens in {sum(alone.seconds):.1f} s"
        f" = {alone.rate:.0f} tok/s",
        f"   batch loaded: {sum(loaded.tokens)} tokens in {sum(loaded.seconds):.1f} s"
        f" = {loaded.rate:.0f} tok/s",
        f"   CPU (core-seconds per second of batch): server {cpu(alone.server_cpu, alone)} alone,"
        f" {cpu(loaded.server_cpu, loaded)} loaded; this process (submitter + pollers)"
        f" {cpu(alone.client_cpu, alone)} alone, {cpu(loaded.client_cpu, loaded)} loaded",
        f"   ratio loaded/alone: {ratio:.2f} (throughput drop {(1 - ratio) * 100:.0f}%;"
        " target: drop < 10%)",
        f"   per round: {' '.join(f'{r:.2f}' for r in round_ratios)}; median"
        f" {statistics.median(round_ratios):.2f}"
        f" (drop {(1 - statistics.median(round_ratios)) * 100:.0f}%)",
    ]
    report_and_record(report, args, "load.py")


if __name__ == "__main__":
    main()
