"""The ``batchd`` command: the server, and client commands for a running server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from batchd.cli import client as cli_client
from batchd.cli import costs as cli_costs
from batchd.cli import db as cli_db

app = typer.Typer(no_args_is_help=True, add_completion=False, help="A self-hosted Batch API.")


@app.callback()
def _root() -> None:
    """batchd: a self-hosted, wire-compatible Batch API for large language models."""


DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        envvar="BATCHD_DATABASE_URL",
        help="Shared database, postgresql+psycopg://user@host/db; unset: SQLite in the data dir"
        " [BATCHD_DATABASE_URL].",
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(envvar="BATCHD_CONFIG", help="Model registry (TOML) [BATCHD_CONFIG]."),
]
DataDirOption = Annotated[
    Path,
    typer.Option(
        envvar="BATCHD_DATA_DIR", help="File bytes, shared by all processes [BATCHD_DATA_DIR]."
    ),
]


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(envvar="BATCHD_HOST", help="Bind address [BATCHD_HOST].")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="BATCHD_PORT", help="Port [BATCHD_PORT].")] = 8000,
    data_dir: Annotated[
        Path, typer.Option(envvar="BATCHD_DATA_DIR", help="Database and files [BATCHD_DATA_DIR].")
    ] = Path("./batchd-data"),
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="Serve a GGUF file as NAME=PATH (repeatable) [BATCHD_MODELS, comma-separated]. "
            "Default: the bundled SmolLM2-135M-Instruct."
        ),
    ] = None,
    quant: Annotated[
        str,
        typer.Option(
            envvar="BATCHD_QUANT",
            help="'q8_0' converts the bundled Q4_1 model once to Q8_0 (faster, same quality); "
            "'as-is' loads it untouched [BATCHD_QUANT].",
        ),
    ] = "q8_0",
    max_seqs: Annotated[
        int,
        typer.Option(
            envvar="BATCHD_MAX_SEQS", help="Sequences decoded together [BATCHD_MAX_SEQS]."
        ),
    ] = 66,
    ctx_size: Annotated[
        int, typer.Option(envvar="BATCHD_CTX_SIZE", help="Total KV cache cells [BATCHD_CTX_SIZE].")
    ] = 135168,
    keys_file: Annotated[
        Path | None,
        typer.Option(
            envvar="BATCHD_KEYS_FILE",
            help="API keys, one '<key> <tenant-name>' per line; re-read on SIGHUP "
            "[BATCHD_KEYS_FILE]. Keys can also come from BATCHD_API_KEYS (comma-separated).",
        ),
    ] = None,
    insecure_no_auth: Annotated[
        bool,
        typer.Option(
            "--insecure-no-auth",
            envvar="BATCHD_INSECURE_NO_AUTH",
            help="Allow a non-loopback --host with no API keys [BATCHD_INSECURE_NO_AUTH].",
        ),
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            envvar="BATCHD_CONFIG",
            help="Model registry (TOML): which model runs on which engine, embedded llama.cpp "
            "or an OpenAI-compatible upstream; see the README [BATCHD_CONFIG].",
        ),
    ] = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Run the HTTP API, the scheduler and the engines in one process."""
    overrides: dict[str, object] = {
        "host": host,
        "port": port,
        "data_dir": data_dir,
        "quant": quant,
        "max_seqs": max_seqs,
        "ctx_size": ctx_size,
        "keys_file": keys_file,
        "insecure_no_auth": insecure_no_auth,
        "config": config,
        "database_url": database_url,
    }
    if model:
        overrides["models"] = model
    _start("all", overrides)


def _start(role: str, overrides: dict[str, object], *, drain: bool = False) -> None:
    from batchd.api.keyring import KeysFileError
    from batchd.config import Settings
    from batchd.engines import registry
    from batchd.errors import BatchdError, ConfigError
    from batchd.runtime import serve as run_server

    config = overrides.get("config")
    if isinstance(config, Path):
        try:
            registry.load(config)  # fail before binding anything, with the key named
        except ConfigError as exc:
            typer.echo(f"batchd: {exc}", err=True)
            raise typer.Exit(2) from None
    # Options not given stay unset, so their BATCHD_* variables (or defaults) apply.
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    try:
        run_server(settings, role, drain=drain)  # type: ignore[arg-type]
    except (BatchdError, KeysFileError) as exc:
        typer.echo(f"batchd: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def api(
    database_url: DatabaseUrlOption = None,
    host: Annotated[
        str, typer.Option(envvar="BATCHD_HOST", help="Bind address [BATCHD_HOST].")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="BATCHD_PORT", help="Port [BATCHD_PORT].")] = 8000,
    data_dir: DataDirOption = Path("./batchd-data"),
    config: ConfigOption = None,
    keys_file: Annotated[
        Path | None, typer.Option(envvar="BATCHD_KEYS_FILE", help="Keys file [BATCHD_KEYS_FILE].")
    ] = None,
    insecure_no_auth: Annotated[
        bool, typer.Option(envvar="BATCHD_INSECURE_NO_AUTH", help="See `serve`.")
    ] = False,
) -> None:
    """HTTP only (stateless; run any number behind a load balancer) on a shared PostgreSQL
    database and data dir; `batchd worker` processes run the batches."""
    _start(
        "api",
        {
            "database_url": database_url,
            "host": host,
            "port": port,
            "data_dir": data_dir,
            "config": config,
            "keys_file": keys_file,
            "insecure_no_auth": insecure_no_auth,
        },
    )


@app.command()
def worker(
    database_url: DatabaseUrlOption = None,
    data_dir: DataDirOption = Path("./batchd-data"),
    config: ConfigOption = None,
    drain: Annotated[
        bool,
        typer.Option(
            "--drain",
            help="Work until the queue holds nothing this worker can run, finish its leases, "
            "and exit 0 (a one-off backlog, or a scale-to-zero job).",
        ),
    ] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            envvar="BATCHD_METRICS_PORT",
            help="Serve Prometheus metrics on this port [BATCHD_METRICS_PORT].",
        ),
    ] = None,
    metrics_host: Annotated[
        str,
        typer.Option(
            envvar="BATCHD_METRICS_HOST", help="Metrics bind address [BATCHD_METRICS_HOST]."
        ),
    ] = "127.0.0.1",
    shutdown_grace_seconds: Annotated[
        float | None,
        typer.Option(
            envvar="BATCHD_SHUTDOWN_GRACE_SECONDS",
            help="On SIGTERM, how long the requests in hand may take to finish before the rest"
            " go back to the queue [BATCHD_SHUTDOWN_GRACE_SECONDS, default 30].",
        ),
    ] = None,
) -> None:
    """Scheduler and engine, no HTTP: leases requests from the shared PostgreSQL database,
    runs them, commits results and finalizes batches. SIGTERM stops it gracefully."""
    _start(
        "worker",
        {
            "database_url": database_url,
            "data_dir": data_dir,
            "config": config,
            "metrics_port": metrics_port,
            "metrics_host": metrics_host,
            "shutdown_grace_seconds": shutdown_grace_seconds,
        },
        drain=drain,
    )


engines_app = typer.Typer(no_args_is_help=True, help="Inspect the configured engines.")
app.add_typer(engines_app, name="engines")


@engines_app.command("check")
def engines_check(
    config: Annotated[
        Path,
        typer.Option(envvar="BATCHD_CONFIG", help="Model registry (TOML) [BATCHD_CONFIG]."),
    ],
) -> None:
    """Probe every upstream (GET /v1/models); exit 1 if any is down."""
    import asyncio

    from rich.console import Console
    from rich.table import Table

    from batchd.engines import registry
    from batchd.engines.check import check
    from batchd.errors import ConfigError

    try:
        reg = registry.load(config)
    except ConfigError as exc:
        typer.echo(f"batchd: {exc}", err=True)
        raise typer.Exit(2) from None
    probes = asyncio.run(check(reg))
    table = Table(title=f"engines in {config}")
    for column in ("model", "engine", "target", "status", "latency", "detail"):
        table.add_column(column)
    for probe in probes:
        latency = f"{probe.latency_ms:.0f} ms" if probe.latency_ms is not None else "-"
        status = "[green]up[/green]" if probe.up else "[red]down[/red]"
        table.add_row(probe.model, probe.engine, probe.target, status, latency, probe.detail)
    Console(width=160).print(table)
    down = [p for p in probes if not p.up]
    if down:
        typer.echo(f"{len(down)} of {len(probes)} engine target(s) down", err=True)
        raise typer.Exit(1)


cli_client.register(app)
cli_costs.register(app)


app.add_typer(cli_db.app, name="db")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
