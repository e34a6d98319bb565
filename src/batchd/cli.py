"""The ``batchd`` command: the server, and client commands for a running server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from batchd import cli_client

app = typer.Typer(no_args_is_help=True, add_completion=False, help="A self-hosted Batch API.")


@app.callback()
def _root() -> None:
    """batchd: a self-hosted, wire-compatible Batch API for large language models."""


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
    ] = 32,
    ctx_size: Annotated[
        int, typer.Option(envvar="BATCHD_CTX_SIZE", help="Total KV cache cells [BATCHD_CTX_SIZE].")
    ] = 65536,
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
) -> None:
    """Run the HTTP API, the scheduler and the embedded engine in one process."""
    from batchd.api.keyring import KeysFileError
    from batchd.config import Settings
    from batchd.errors import BatchdError
    from batchd.server import serve as run_server

    overrides: dict[str, object] = {
        "host": host,
        "port": port,
        "data_dir": data_dir,
        "quant": quant,
        "max_seqs": max_seqs,
        "ctx_size": ctx_size,
        "keys_file": keys_file,
        "insecure_no_auth": insecure_no_auth,
    }
    if model:
        overrides["models"] = model
    settings = Settings(**overrides)  # type: ignore[arg-type]
    try:
        run_server(settings)
    except (BatchdError, KeysFileError) as exc:
        typer.echo(f"batchd: {exc}", err=True)
        raise typer.Exit(2) from None


cli_client.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
