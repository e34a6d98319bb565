"""``batchd estimate | usage``: what a batch file will cost and take before it is submitted,
and the tenant's batch usage, cost and saving per day. Clients of a running server (the
estimate needs the served models' tokenizers and the engine's measured throughput)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table

from batchd.cli.client import (
    DEFAULT_URL,
    KeyOption,
    UrlOption,
    err,
    fail,
    format_cost,
    infer_endpoint,
    stdout_console,
)

__all__ = ["register"]

ESTIMATE_TIMEOUT_SECONDS = 600.0  # counting 50,000 lines' tokens takes a while


def _request(method: str, url: str, api_key: str, path: str, **kwargs: Any) -> Any:
    try:
        response = httpx.request(
            method,
            url.rstrip("/") + path,
            headers={"authorization": f"Bearer {api_key}", **kwargs.pop("headers", {})},
            timeout=ESTIMATE_TIMEOUT_SECONDS,
            **kwargs,
        )
    except httpx.TransportError:
        raise fail(f"cannot reach a batchd server at {url} (is `batchd serve` running?)") from None
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code >= 400:
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else response.text[:200]
        raise fail(f"{message} (HTTP {response.status_code})")
    return body


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m {rest}s" if hours else f"{minutes}m {rest}s"


def estimate(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A batch .jsonl.")],
    endpoint: Annotated[str | None, typer.Option(help="Default: the first line's url.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw estimate.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = "none",
) -> None:
    """Estimate a batch file before submitting it: prompt tokens counted with the served
    models' tokenizers, expected output, cost at batch and realtime prices, and the time it
    will take behind the queue at the engine's recently measured throughput."""
    chosen = endpoint or infer_endpoint(path)
    answer = _request(
        "POST",
        url,
        api_key,
        "/v1/batches/estimate",
        params={"endpoint": chosen},
        content=path.read_bytes(),
        headers={"content-type": "application/jsonl"},
    )
    if as_json:
        print(json.dumps(answer, indent=2))
        return
    table = Table(show_header=False, title=f"estimate of {path.name}")
    table.add_column(style="bold")
    table.add_column()
    exact = "" if answer["input_tokens_exact"] else " (approximate)"
    failing = answer["requests_failing"]
    table.add_row(
        "requests", f"{answer['requests']}" + (f" ({failing} would fail)" if failing else "")
    )
    table.add_row("prompt tokens", f"{answer['input_tokens']}{exact}")
    output = answer["output_tokens"]
    table.add_row("output tokens", f"{output['expected']} expected, {output['max']} at most")
    table.add_row("cost", format_cost(answer["cost"]))
    table.add_row("cost at most", format_cost(answer["cost_max"]))
    timing = answer["time"]
    table.add_row(
        "time",
        f"{_duration(timing['seconds'])} ({timing['queue_ahead_requests']} requests ahead,"
        f" {timing['throughput_tokens_per_second']} tokens/s measured)",
    )
    stdout_console().print(table)
    for line in answer["failing_lines"]:
        err.print(f"line {line['line']} ({line['custom_id']}): {line['message']}", markup=False)
    for assumption in answer["assumptions"]:
        err.print(f"- {assumption}", markup=False, style="dim")


def usage(
    days: Annotated[int, typer.Option(min=1, max=366, help="How many days back.")] = 14,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw totals.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = "none",
) -> None:
    """Your batches' requests, tokens, cost and saving per day."""
    answer = _request("GET", url, api_key, "/console/api/usage", params={"days": days})
    if as_json:
        print(json.dumps(answer, indent=2))
        return
    table = Table("date", "batches", "requests", "input", "cached", "output", "cost", "saved")
    for day in answer["data"]:
        cost = day["cost"]
        table.add_row(
            day["date"],
            str(day["batches"]),
            str(day["requests"]),
            str(day["input_tokens"]),
            str(day["cached_tokens"]),
            str(day["output_tokens"]),
            f"{cost['batch']:.6f} {cost['currency']}",
            f"{cost['saving']:.6f} ({cost['saving_percent']}%)",
        )
    stdout_console().print(table)


def register(app: typer.Typer) -> None:
    for command in (estimate, usage):
        app.command()(command)
