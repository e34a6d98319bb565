"""Shared pieces of the benchmarks: a real server process, workloads, timing, reporting."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

TOPICS = [
    "owls", "comets", "basalt", "tides", "glaciers", "lichen", "magnets", "volcanoes",
    "bees", "coral", "deserts", "rainbows", "octopuses", "fungi", "thunder", "sand dunes",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    data_dir: Path
    proc: subprocess.Popen[bytes]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="bench", max_retries=0, timeout=600)


@contextlib.contextmanager
def server(**env: str) -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="batchd-bench-") as tmp:
        port = free_port()
        data_dir = Path(tmp)
        log = (data_dir / "server.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "batchd.cli", "serve", "--port", str(port), "--data-dir", tmp],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    raise RuntimeError((data_dir / "server.log").read_text()[-3000:])
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not start")
                time.sleep(0.2)
            yield Server(url=url, data_dir=data_dir, proc=proc)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def chat_body(user: str, max_tokens: int, system: str | None = None) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    return {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0}


def small_chat_workload(n: int, max_tokens: int) -> list[dict[str, Any]]:
    """~40 prompt tokens after the chat template, distinct per request."""
    return [
        chat_body(
            f"Request {i}: in two or three sentences, tell me something surprising about "
            f"{TOPICS[i % len(TOPICS)]} that most people do not know.",
            max_tokens,
        )
        for i in range(n)
    ]


def run_sequential(
    client: openai.OpenAI, bodies: list[dict[str, Any]], usage: dict[str, int] | None = None
) -> tuple[float, int]:
    """Each request through the realtime endpoint, one after another: (seconds, tokens).
    ``usage``, if given, gains the prompt and cached prompt tokens of them all."""
    tokens = 0
    start = time.perf_counter()
    for body in bodies:
        response = client.chat.completions.create(**body)
        if response.usage is None:
            continue
        tokens += response.usage.completion_tokens
        if usage is not None:
            details = response.usage.prompt_tokens_details
            usage["prompt_tokens"] = usage.get("prompt_tokens", 0) + response.usage.prompt_tokens
            usage["cached_tokens"] = usage.get("cached_tokens", 0) + (
                (details.cached_tokens or 0) if details else 0
            )
    return time.perf_counter() - start, tokens


POLL_SECONDS = 0.25


def run_batch(client: openai.OpenAI, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """The same requests as one batch, upload to downloaded results: timing and usage."""
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        for i, body in enumerate(bodies)
    ]
    data = "\n".join(json.dumps(line) for line in lines).encode()
    start = time.perf_counter()
    file = client.files.create(file=("bench.jsonl", data), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        # Four polls a second: the end is seen within 0.25 s (3% of the 64-request batch), and
        # the poller does not take the CPU it measures. At 20 a second (the bench's rate until
        # 2026-12-04) the polls alone cost the batch 7-12% on two cores, a cost of the
        # measuring client, not of the service: the SDK's users poll every few seconds.
        time.sleep(POLL_SECONDS)
        batch = client.batches.retrieve(batch.id)
    content = client.files.content(batch.output_file_id).text if batch.output_file_id else ""
    seconds = time.perf_counter() - start
    assert batch.status == "completed", batch
    rows = [json.loads(x) for x in content.splitlines() if x.strip()]
    assert len(rows) == len(bodies), f"{len(rows)} of {len(bodies)} succeeded"
    usage = batch.usage
    return {
        "seconds": seconds,
        "completion_tokens": usage.output_tokens if usage else 0,
        "prompt_tokens": usage.input_tokens if usage else 0,
        "cached_tokens": usage.input_tokens_details.cached_tokens if usage else 0,
        "rows": rows,
    }


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


RESULTS = Path(__file__).with_name("RESULTS.md")


def append_record(command: str, report: list[str], title: str = "") -> None:
    """Append one run to bench/RESULTS.md: when, on what machine, the command, what it printed."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    heading = f"{stamp} — {title}" if title else stamp
    with RESULTS.open("a") as out:
        out.write(
            f"\n## {heading}\n\nmachine: {machine()}\n\ncommand: `{command}`\n\n```\n"
            + "\n".join(report)
            + "\n```\n"
        )


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's argument parser: its docstring as the help, and ``--no-record``."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    return parser


def command_line(script: str, args: argparse.Namespace, **shown: str) -> str:
    """The command that ran, rebuilt from the parsed flags (so a record can never quote a
    flag the script does not have). ``shown``: a flag's text in place of its value (a temp
    path, say); flags left at None or False are omitted."""
    words = [f"python bench/{script}"]
    for name, value in vars(args).items():
        if name == "no_record" or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        if name in shown:
            words.append(f"{flag} {shown[name]}")
        elif value is True:
            words.append(flag)
        else:
            words.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(words)


def report_and_record(
    report: list[str], args: argparse.Namespace, script: str, title: str = "", **shown: str
) -> None:
    """Print a benchmark's report and, unless ``--no-record``, append it to RESULTS.md."""
    print("\n".join(report), flush=True)
    if not args.no_record:
        append_record(command_line(script, args, **shown), report, title)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]
