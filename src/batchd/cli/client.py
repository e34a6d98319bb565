"""``batchd submit | status | results | cancel | retry | ls``: clients of a running server,
built on the official ``openai`` SDK (the same calls a user's own code would make).

Machine-readable output (batch ids, ``--json``, result lines) goes to stdout; progress, summaries
and errors go to stderr, so ``batchd results ID > out.jsonl`` and ``ID=$(batchd submit f.jsonl)``
just work.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Annotated, Any
from urllib.parse import quote

import openai
import typer
from openai.types import Batch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

__all__ = ["format_cost", "register"]

TERMINAL = ("completed", "failed", "expired", "cancelled")
POLL_SECONDS = 1.0
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_ENDPOINT = "/v1/chat/completions"

# Exit codes of `submit --wait` beyond 0 (completed) and 1 (usage or server error).
EXIT_BATCH_FAILED = 2
EXIT_BATCH_UNFINISHED = 3  # expired or cancelled; partial results are still downloaded
EXIT_INTERRUPTED = 130

err = Console(stderr=True, soft_wrap=True, highlight=False)

UrlOption = Annotated[str, typer.Option(envvar="BATCHD_URL", help="Server base URL [BATCHD_URL].")]
KeyOption = Annotated[
    str,
    typer.Option(
        envvar="BATCHD_API_KEY",
        help="API key; any value works on a server without keys [BATCHD_API_KEY].",
    ),
]


def _client(url: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=2)


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print("error: " + message, style="red", markup=False)
    return typer.Exit(code)


@contextmanager
def _server_errors(url: str) -> Iterator[None]:
    """Turn SDK exceptions into one clear line on stderr and exit code 1 (no traceback)."""
    try:
        yield
    except openai.APIConnectionError:
        raise fail(f"cannot reach a batchd server at {url} (is `batchd serve` running?)") from None
    except openai.APIStatusError as exc:
        # The SDK unwraps {"error": {...}} into exc.body.
        body = exc.body if isinstance(exc.body, dict) else {}
        message = body.get("message") or exc.message
        raise fail(f"{message} (HTTP {exc.status_code})") from None


def stdout_console() -> Console:
    # Piped output keeps whole ids on one line instead of wrapping at 80 columns.
    return Console() if sys.stdout.isatty() else Console(width=200)


def _when(timestamp: int | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def format_cost(cost: dict[str, Any]) -> str:
    """``0.000123 USD at batch prices (realtime 0.000246: saved 0.000123, 50.0%)``."""
    currency = cost.get("currency", "")
    return (
        f"{cost.get('batch', 0):.6f} {currency} at batch prices (realtime "
        f"{cost.get('realtime', 0):.6f}: saved {cost.get('saving', 0):.6f},"
        f" {cost.get('saving_percent', 0)}%)"
    )


def _counts(batch: Batch) -> tuple[int, int, int]:
    counts = batch.request_counts
    return (counts.completed, counts.failed, counts.total) if counts else (0, 0, 0)


def _summary(batch: Batch) -> str:
    completed, failed, total = _counts(batch)
    return f"{batch.id} {batch.status}: {completed} completed, {failed} failed, {total} total"


def _parse_metadata(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {item!r}", param_hint="--metadata")
        pairs[key] = value
    return pairs


def infer_endpoint(path: Path) -> str:
    """The first non-blank line's ``url``; malformed files are left to the server to report."""
    with path.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    return str(json.loads(raw)["url"])
                except (ValueError, KeyError, TypeError):
                    break
    return DEFAULT_ENDPOINT


def _stream_file(client: openai.OpenAI, file_id: str, out: IO[bytes]) -> None:
    with client.files.with_streaming_response.content(file_id) as response:
        for chunk in response.iter_bytes():
            out.write(chunk)


def _follow(client: openai.OpenAI, batch_id: str) -> Batch:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[red]{task.fields[failed]} failed"),
        TimeElapsedColumn(),
        console=err,
    ) as progress:
        task = progress.add_task("validating", total=None, failed=0)
        while True:
            batch = client.batches.retrieve(batch_id)
            completed, failed, total = _counts(batch)
            progress.update(
                task,
                description=batch.status,
                completed=completed + failed,
                total=total or None,
                failed=failed,
            )
            if batch.status in TERMINAL:
                return batch
            time.sleep(POLL_SECONDS)


def _error_lines(batch: Batch) -> list[str]:
    data = (batch.errors.data if batch.errors else None) or []
    return [
        (f"line {e.line}: " if e.line is not None else "") + f"{e.code}: {e.message}" for e in data
    ]


def submit(
    file: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, readable=True, help="A JSONL batch file."),
    ],
    endpoint: Annotated[
        str | None, typer.Option(help="Default: the first line's url.", show_default=False)
    ] = None,
    window: Annotated[str, typer.Option(help="Completion window: 24h, or 1m..7d.")] = "24h",
    wait: Annotated[
        bool,
        typer.Option(
            help="Follow progress, then write FILE.output.jsonl / FILE.errors.jsonl beside FILE. "
            "Exit 2 if the batch failed, 3 if it expired or was cancelled."
        ),
    ] = False,
    metadata: Annotated[
        list[str] | None, typer.Option(help="key=value (repeatable).", show_default=False)
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = "none",
) -> None:
    """Upload a JSONL file and start a batch; print its id."""
    meta = _parse_metadata(metadata)
    client = _client(url, api_key)
    with _server_errors(url):
        with file.open("rb") as handle:  # the SDK streams an open file; it does not read() it
            uploaded = client.files.create(file=(file.name, handle), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id,
            endpoint=endpoint or infer_endpoint(file),  # type: ignore[arg-type]
            completion_window=window,  # type: ignore[arg-type]
            metadata=meta,
        )
        print(batch.id, flush=True)
        if not wait:
            return
        stem = file.name.removesuffix(".jsonl")
        _wait_and_download(
            client,
            batch.id,
            file.with_name(f"{stem}.output.jsonl"),
            file.with_name(f"{stem}.errors.jsonl"),
        )


def _wait_and_download(client: openai.OpenAI, batch_id: str, output: Path, errors: Path) -> None:
    """Follow the batch to its end, then write its output and error files (those it has) to
    ``output`` and ``errors``. Exit 2 if it failed, 3 if it expired or was cancelled (its
    partial results written all the same)."""
    try:
        batch = _follow(client, batch_id)
    except KeyboardInterrupt:
        err.print(f"stopped following; the batch keeps running: batchd status {batch_id}")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    err.print(_summary(batch), markup=False)
    if batch.status == "failed":
        for line in _error_lines(batch):
            err.print("  " + line, markup=False)
        raise typer.Exit(EXIT_BATCH_FAILED)
    for file_id, target in ((batch.output_file_id, output), (batch.error_file_id, errors)):
        if file_id:
            with target.open("wb") as out:
                _stream_file(client, file_id, out)
            err.print(f"wrote {target}", markup=False)
    if batch.usage is not None:
        usage = batch.usage
        err.print(
            f"tokens: {usage.input_tokens} in, {usage.output_tokens} out, "
            f"{usage.total_tokens} total"
        )
    if batch.status != "completed":
        raise typer.Exit(EXIT_BATCH_UNFINISHED)


def retry(
    batch_id: Annotated[str, typer.Argument(help="An ended batch's id (batch_...).")],
    wait: Annotated[
        bool,
        typer.Option(
            help="Follow progress, then write the new batch's output file (see --output) and"
            " NAME.errors.jsonl beside it. Exit 2 if it failed, 3 if it expired or was cancelled."
        ),
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="With --wait, the output file. Default: NEW_BATCH_ID.output.jsonl.",
            show_default=False,
        ),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = "none",
) -> None:
    """Retry a batch's failed, expired and cancelled requests as a new batch; print its id."""
    client = _client(url, api_key)
    with _server_errors(url):
        batch = client.post(
            f"/batches/{quote(batch_id, safe='')}/retry",
            cast_to=Batch,
            body={},
            # The SDK repeats a request whose answer was lost: the key makes that one retry.
            options={"headers": {"Idempotency-Key": f"batchd-cli-retry-{uuid.uuid4()}"}},
        )
        print(batch.id, flush=True)
        if not wait:
            return
        target = output or Path(f"{batch.id}.output.jsonl")
        stem = target.name.removesuffix(".jsonl").removesuffix(".output")
        _wait_and_download(client, batch.id, target, target.with_name(f"{stem}.errors.jsonl"))


def _status_table(batch: Batch) -> Table:
    completed, failed, total = _counts(batch)
    table = Table(show_header=False, title=batch.id)
    table.add_column(style="bold")
    table.add_column()

    def add_row(name: str, value: str) -> None:
        table.add_row(name, Text(value))  # Text: server strings are not rich markup

    add_row("status", batch.status)
    add_row("endpoint", batch.endpoint)
    if batch.model:
        add_row("model", batch.model)
    add_row("requests", f"{completed} completed / {failed} failed / {total} total")
    if batch.usage is not None:
        usage = batch.usage
        add_row(
            "tokens",
            f"{usage.input_tokens} in "
            f"({usage.input_tokens_details.cached_tokens} cached) / "
            f"{usage.output_tokens} out / {usage.total_tokens} total",
        )
    extension = (batch.model_extra or {}).get("batchd")
    if isinstance(extension, dict) and isinstance(extension.get("cost"), dict):
        add_row("cost", format_cost(extension["cost"]))
    add_row("input file", batch.input_file_id)
    add_row("output file", batch.output_file_id or "-")
    add_row("error file", batch.error_file_id or "-")
    add_row("window", batch.completion_window)
    for name in (
        "created_at",
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "cancelling_at",
        "cancelled_at",
        "expired_at",
        "expires_at",
    ):
        stamp: int | None = getattr(batch, name)
        if stamp is not None:
            add_row(name.removesuffix("_at").replace("_", " "), _when(stamp))
    if batch.metadata:
        add_row("metadata", ", ".join(f"{k}={v}" for k, v in batch.metadata.items()))
    for line in _error_lines(batch):
        add_row("error", line)
    return table


def status(
    batch_id: Annotated[str, typer.Argument(help="A batch id (batch_...).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw Batch object.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = "none",
) -> None:
    """Show a batch: status, counts, usage, timestamps and file ids."""
    client = _client(url, api_key)
    with _server_errors(url):
        if as_json:
            raw = client.batches.with_raw_response.retrieve(batch_id)
            print(json.dumps(raw.http_response.json(), indent=2))
            return
        batch = client.batches.retrieve(batch_id)
    stdout_console().print(_status_table(batch))


def results(
    batch_id: Annotated[str, typer.Argument(help="A batch id (batch_...).")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write here instead of stdout.")
    ] = None,
    errors: Annotated[bool, typer.Option("--errors", help="The error file instead.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = "none",
) -> None:
    """Stream a batch's output file (or error file) to stdout or to -o."""
    client = _client(url, api_key)
    with _server_errors(url):
        batch = client.batches.retrieve(batch_id)
        file_id = batch.error_file_id if errors else batch.output_file_id
        if not file_id:
            kind = "error" if errors else "output"
            raise fail(f"batch {batch_id} has no {kind} file (status {batch.status})")
        if output is None:
            _stream_file(client, file_id, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return
        with output.open("wb") as out:
            _stream_file(client, file_id, out)


def cancel(
    batch_id: Annotated[str, typer.Argument(help="A batch id (batch_...).")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = "none",
) -> None:
    """Cancel a batch: unfinished requests end as batch_cancelled, finished ones are kept."""
    with _server_errors(url):
        batch = _client(url, api_key).batches.cancel(batch_id)
    print(_summary(batch))


def ls(
    limit: Annotated[int, typer.Option(min=1, max=100, help="How many batches.")] = 20,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = "none",
) -> None:
    """List recent batches, newest first."""
    with _server_errors(url):
        page = _client(url, api_key).batches.list(limit=limit)
    table = Table("id", "status", "completed", "failed", "total", "created", "endpoint")
    for batch in page.data:
        completed, failed, total = _counts(batch)
        table.add_row(
            batch.id,
            batch.status,
            str(completed),
            str(failed),
            str(total),
            _when(batch.created_at),
            batch.endpoint,
        )
    stdout_console().print(table)


def register(app: typer.Typer) -> None:
    for command in (submit, status, results, cancel, retry, ls):
        app.command()(command)
