"""What one poll costs the API by itself: server CPU per request of GET /v1/batches/{id},
GET /v1/batches, GET /v1/messages/batches/{id} and GET /v1/messages/batches, with no batch
running (the engine idle), so the figure is the HTTP, auth, routing, store and rendering path
alone.

Each arm is its own ``batchd serve`` (SQLite, temp data dir, an API key configured, the fake
engine) holding --batches ended batches per surface. --clients keep-alive clients (the minimal
HTTP/1.1 client of bench/load.py) send --requests GETs of one kind as fast as the server
answers; server CPU is read from /proc before and after. Then "paced mix": bench/load.py's
pollers (--paced-clients, each GET /v1/batches/{id} once a second, GET /v1/batches on every
fifth poll) for --paced-seconds, load.py's "same load, no batch running" figure without its
model and batch. With ``--baseline SRC`` (a ``src``
directory of another checkout, e.g. from ``git archive <rev> src | tar -x -C /tmp/base``) a
second arm runs that code, and the arms alternate for --rounds, side by side in one run.

    .venv/bin/python bench/bench_api_cpu.py [--baseline /tmp/base/src] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

from _harness import bench_parser, machine, report_and_record, server
from bench_poll_cost import hammer
from load import PollingLoad

API_KEY = "bench"  # bench_poll_cost's clients send this key; here the server requires it
ENDED = ("completed", "failed", "expired", "cancelled", "ended")


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _wait_ended(http: httpx.Client, path: str, field: str) -> None:
    deadline = time.monotonic() + 120
    while http.get(path).json()[field] not in ENDED:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not end")
        time.sleep(0.1)


def make_batches(url: str, count: int) -> tuple[str, str]:
    """``count`` ended batches on each surface; the id of the last one of each."""
    headers = {"authorization": f"Bearer {API_KEY}"}
    body: dict[str, Any] = {
        "model": "default",
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 4,
    }
    openai_id = anthropic_id = ""
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        for i in range(count):
            lines = "\n".join(
                json.dumps(
                    {
                        "custom_id": f"r{j}",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": body,
                    }
                )
                for j in range(3)
            )
            file_id = http.post(
                "/v1/files",
                files={"file": ("in.jsonl", lines.encode())},
                data={"purpose": "batch"},
            ).json()["id"]
            openai_id = http.post(
                "/v1/batches",
                json={
                    "input_file_id": file_id,
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                    "metadata": {"run": str(i)},
                },
            ).json()["id"]
            _wait_ended(http, f"/v1/batches/{openai_id}", "status")
            anthropic_id = http.post(
                "/v1/messages/batches",
                json={"requests": [{"custom_id": f"m{j}", "params": body} for j in range(3)]},
            ).json()["id"]
            _wait_ended(http, f"/v1/messages/batches/{anthropic_id}", "processing_status")
    return openai_id, anthropic_id


def measure_arm(args: argparse.Namespace, src: str | None) -> dict[str, tuple[float, float]]:
    """Per kind: (CPU ms per request, of which system ms); "idle": the idle server's own CPU,
    ms per second."""
    env = {
        "BATCHD_ENGINE": "fake",
        "BATCHD_FAKE_STEP_SECONDS": "0",
        "BATCHD_API_KEYS": API_KEY,
    }
    if src is not None:
        env["PYTHONPATH"] = src
    with server(**env) as srv:
        openai_id, anthropic_id = make_batches(srv.url, args.batches)
        paths = {
            "openai retrieve": f"/v1/batches/{openai_id}",
            "openai list": "/v1/batches",
            "anthropic retrieve": f"/v1/messages/batches/{anthropic_id}",
            "anthropic list": "/v1/messages/batches",
        }
        for path in paths.values():  # warm-up: imports, caches, the first query plans
            asyncio.run(hammer(srv.url, path, args.clients, 200))
        pid = srv.proc.pid
        user, system = cpu_times(pid)
        time.sleep(2)
        after = cpu_times(pid)
        figures = {"idle": ((after[0] + after[1] - user - system) / 2 * 1000, 0.0)}
        for name, path in paths.items():
            user, system = cpu_times(pid)
            asyncio.run(hammer(srv.url, path, args.clients, args.requests))
            after = cpu_times(pid)
            per_request = 1000 / args.requests
            figures[name] = (
                (after[0] + after[1] - user - system) * per_request,
                (after[1] - system) * per_request,
            )
        # bench/load.py's pollers: --paced-clients, each retrieving once a second and listing
        # on every fifth poll, so the server wakes for each request instead of finding many
        # waiting (and its own idle work, ~15 ms/s, is shared by fewer requests).
        if args.paced_seconds > 0:
            load = PollingLoad(srv.url, args.paced_clients, 1.0, 5)
            load.start(target=openai_id)
            try:
                load.recording, user, system = True, *cpu_times(pid)
                time.sleep(args.paced_seconds)
                load.recording, after = False, cpu_times(pid)
            finally:
                load.stop()
            sent = sum(len(v) for v in load.latencies.values())
            if load.errors or not sent:
                raise RuntimeError(f"paced load: {sent} requests, errors {dict(load.errors)}")
            figures["paced mix"] = (
                (after[0] + after[1] - user - system) / sent * 1000,
                (after[1] - system) / sent * 1000,
            )
        return figures


def _line(figures: dict[str, tuple[float, float]]) -> str:
    kinds = ", ".join(f"{k} {v[0]:.2f} ({v[1]:.2f})" for k, v in figures.items() if k != "idle")
    return f"{kinds}; idle {figures['idle'][0]:.0f} ms/s"


def main() -> None:
    parser = bench_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20, help="concurrent keep-alive clients")
    parser.add_argument("--requests", type=int, default=3000, help="GETs per kind per round")
    parser.add_argument("--batches", type=int, default=5, help="ended batches per surface")
    parser.add_argument("--rounds", type=int, default=2, help="arms alternate this many times")
    parser.add_argument(
        "--paced-clients", type=int, default=200, help="load.py-style pollers, 1 poll/s each"
    )
    parser.add_argument(
        "--paced-seconds", type=float, default=10, help="how long they poll (0: not at all)"
    )
    parser.add_argument("--baseline", type=Path, help="a src/ directory to compare against")
    args = parser.parse_args()

    print(f"machine: {machine()}", flush=True)
    arms: dict[str, str | None] = {"this tree": None}
    if args.baseline is not None:
        arms = {"baseline": str(args.baseline.resolve()), **arms}
    totals: dict[str, dict[str, list[float]]] = {label: {} for label in arms}
    for round_no in range(1, args.rounds + 1):
        for label, src in arms.items():
            figures = measure_arm(args, src)
            print(f"   round {round_no} {label}: {_line(figures)}", flush=True)
            for key, (total, system) in figures.items():
                sums = totals[label].setdefault(key, [0.0, 0.0])
                sums[0] += total / args.rounds
                sums[1] += system / args.rounds
    report = [
        f"server CPU per poll, no batch running: {args.clients} keep-alive clients, {args.requests}"
        f" GETs per kind back to back; paced mix: {args.paced_clients} clients polling 1/s (every"
        f" 5th a list) for {args.paced_seconds:g} s; {args.batches} ended batches per surface, an"
        f" API key, {args.rounds} rounds (ms of server CPU per request, in brackets the system"
        " part; idle: the server's own CPU in ms per second)",
    ]
    for label, sums in totals.items():
        report.append(f"   {label:9}: {_line({k: (v[0], v[1]) for k, v in sums.items()})}")
    if args.baseline is not None:
        base, new = totals["baseline"], totals["this tree"]
        report.append(
            "   ratio baseline/this tree: "
            + ", ".join(f"{k} {base[k][0] / new[k][0]:.1f}x" for k in new if k != "idle")
        )
    report_and_record(
        report,
        args,
        "bench_api_cpu.py",
        "server CPU per poll",
        baseline="<src of the commit before>",
    )


if __name__ == "__main__":
    main()
