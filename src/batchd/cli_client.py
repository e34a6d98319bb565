"""``batchd submit | status | results | cancel | ls``: clients of a running server, built on the
official ``openai`` SDK (the same calls a user's own code would make)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import openai
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

TERMINAL = ("completed", "failed", "expired", "cancelled")
console = Console(stderr=True)
T = TypeVar("T")

UrlOption = Annotated[str, typer.Option(envvar="BATCHD_URL", help="Server base URL [BATCHD_URL].")]
KeyOption = Annotated[str, typer.Option(envvar="BATCHD_API_KEY", help="API key [BATCHD_API_KEY].")]


def _client(url: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=2)


@contextmanager
def _server_errors(url: str) -> Iterator[None]:
    """Turn SDK exceptions into one clear line and exit code 1 (no traceback)."""
    try:
        yield
    except openai.APIConnectionError:
        console.print(f"[red]error:[/] cannot reach a batchd server at {url}")
        raise typer.Exit(1) from None
    except openai.APIStatusError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        message = body.get("message") or str(exc)
        console.print(f"[red]error ({exc.status_code}):[/] {message}")
        raise typer.Exit(1) from None


def _call(url: str, fn: Callable[[], T]) -> T:
    with _server_errors(url):
        return fn()


def _infer_endpoint(path: Path) -> str:
    with path.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    return str(json.loads(raw)["url"])
                except (ValueError, KeyError, TypeError):
                    break
    return "/v1/chat/completions"


def _counts_line(batch: Any) -> str:
    counts = batch.request_counts
    if counts is None:
        return batch.status
    return f"{batch.status}: {counts.completed} completed, {counts.failed} failed, {counts.total} total"


def _download(client: openai.OpenAI, file_id: str, target: Path) -> None:
    with (
        client.files.with_streaming_response.content(file_id) as response,
        target.open("wb") as out,
    ):
        for chunk in response.iter_bytes():
            out.write(chunk)


def _wait(client: openai.OpenAI, url: str, batch_id: str) -> Any:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("validating", total=None)
        while True:
            batch = _call(url, lambda: client.batches.retrieve(batch_id))
            counts = batch.request_counts
            done = (counts.completed + counts.failed) if counts else 0
            progress.update(
                task,
                description=f"{batch.status} ({counts.failed if counts else 0} failed)",
                completed=done,
                total=(counts.total or None) if counts else None,
            )
            if batch.status in TERMINAL:
                return batch
            time.sleep(1.0)


def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A JSONL batch file.")],
    endpoint: Annotated[str | None, typer.Option(help="Default: the first line's url.")] = None,
    window: Annotated[str, typer.Option(help="Completion window: 24h, or 1m..7d.")] = "24h",
    wait: Annotated[bool, typer.Option(help="Follow progress, then download results.")] = True,
    metadata: Annotated[list[str] | None, typer.Option(help="key=value (repeatable).")] = None,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = "none",
) -> None:
    """Upload a JSONL file, start a batch, and (with --wait) write the results next to it."""
    client = _client(url, api_key)
    meta = dict(item.split("=", 1) for item in metadata or [] if "=" in item) or None
    with file.open("rb") as handle:
        uploaded = _call(
            url, lambda: client.files.create(file=(file.name, handle), purpose="batch")
        )
    batch = _call(
        url,
        lambda: client.batches.create(
            input_file_id=uploaded.id,
            endpoint=endpoint or _infer_endpoint(file),  # type: ignore[arg-type]
            completion_window=window,  # type: ignore[arg-type]
            metadata=meta,
        ),
    )
    print(batch.id)
    if not wait:
        return
    batch = _wait(client, url, batch.id)
    console.print(_counts_line(batch))
    if batch.status == "failed":
        for error in batch.errors.data if batch.errors else []:
            where = f"line {error.line}: " if error.line else ""
            console.print(f"  {where}{error.code}: {error.message}")
        raise typer.Exit(2)
    stem = file.with_suffix("")
    with _server_errors(url):
        for file_id, suffix in ((batch.output_file_id, "output"), (batch.error_file_id, "errors")):
            if file_id:
                target = stem.with_name(f"{stem.name}.{suffix}.jsonl")
                _download(client, file_id, target)
                console.print(f"wrote {target}")
    if batch.status != "completed":
        raise typer.Exit(3)


def status(
    batch_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw Batch object.")] = False,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = "none",
) -> None:
    """Show a batch: status, counts, usage, timestamps and files."""
    batch = _call(url, lambda: _client(url, api_key).batches.retrieve(batch_id))
    if as_json:
        print(batch.model_dump_json(indent=2))
        return
    table = Table(show_header=False)
    for key, value in batch.model_dump().items():
        if value is not None:
            table.add_row(key, json.dumps(value) if isinstance(value, dict | list) else str(value))
    Console().print(table)


def results(
    batch_id: str,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write here.")] = None,
    errors: Annotated[bool, typer.Option("--errors", help="The error file instead.")] = False,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = "none",
) -> None:
    """Stream a batch's output file (or error file) to stdout or to -o."""
    client = _client(url, api_key)
    batch = _call(url, lambda: client.batches.retrieve(batch_id))
    file_id = batch.error_file_id if errors else batch.output_file_id
    if not file_id:
        console.print(
            f"[red]error:[/] batch {batch_id} has no {'error' if errors else 'output'} file ({batch.status})"
        )
        raise typer.Exit(1)
    with _server_errors(url):
        if output is not None:
            _download(client, file_id, output)
            return
        with client.files.with_streaming_response.content(file_id) as response:
            for chunk in response.iter_bytes():
                sys.stdout.buffer.write(chunk)
        sys.stdout.flush()


def cancel(
    batch_id: str,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = "none",
) -> None:
    """Cancel a batch: unfinished requests end as batch_cancelled, finished ones are kept."""
    batch = _call(url, lambda: _client(url, api_key).batches.cancel(batch_id))
    print(_counts_line(batch))


def ls(
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
    url: UrlOption = "http://127.0.0.1:8000",
    api_key: KeyOption = "none",
) -> None:
    """List recent batches, newest first."""
    page = _call(url, lambda: _client(url, api_key).batches.list(limit=limit))
    table = Table("id", "status", "completed", "failed", "total", "created")
    for batch in page.data:
        counts = batch.request_counts
        table.add_row(
            batch.id,
            batch.status,
            str(counts.completed if counts else 0),
            str(counts.failed if counts else 0),
            str(counts.total if counts else 0),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(batch.created_at)),
        )
    Console(width=200).print(table)


def register(app: typer.Typer) -> None:
    for command in (submit, status, results, cancel, ls):
        app.command()(command)
