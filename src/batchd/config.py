"""One settings object: CLI flags, then BATCHD_* environment variables, then defaults.

Built once at the edge (``batchd serve``) and handed explicitly to the app and the scheduler;
nothing reads the environment at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BATCHD_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("./batchd-data")
    # Comma-separated. Empty: every request is accepted (and the server says so loudly).
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # One '<key> <tenant-name> [weight=W]' per line; several keys may share a tenant; W is the
    # tenant's share of batch capacity (default 1). Re-read on SIGHUP.
    keys_file: Path | None = None
    # Serving on a non-loopback address with no keys is refused unless this is set.
    insecure_no_auth: bool = False
    public_url: str | None = None  # base URL clients reach us on (Anthropic results_url)
    # SQLAlchemy URL of a shared database (postgresql+psycopg://user@host/db). Unset: SQLite
    # in the data dir, for one process.
    database_url: str | None = None
    # Where file bytes live: unset, <data_dir>/files (a shared volume for many processes);
    # s3://bucket/prefix for S3-compatible object storage (the s3 extra), at
    # s3_endpoint_url when it is not AWS (MinIO, Ceph, R2...).
    files_url: str | None = None
    s3_endpoint_url: str | None = None
    # Connections each process keeps open to a shared database, and how many more it may open
    # at a peak. The server's max_connections must cover (size + overflow) x processes.
    # How old the request counts of a running batch may be in a retrieve or list: pollers of
    # one batch share a count per interval instead of each re-counting all its rows. 0: count
    # on every read. A changed status is always shown with counts taken under it.
    batch_counts_max_age_seconds: float = Field(default=1.0, ge=0)
    database_pool_size: int = Field(default=10, ge=1)
    database_max_overflow: int = Field(default=10, ge=0)

    # The model registry (TOML, see engines/registry.py). When set, it alone says which models are
    # served and by which engine; the embedded-engine settings below are its defaults.
    config: Path | None = None

    # Embedded engine.
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)  # name=path.gguf
    quant: Literal["q8_0", "as-is"] = "q8_0"
    n_threads: int = Field(default_factory=lambda: os.cpu_count() or 2)
    # KV cells in all; each sequence gets ctx_size // max_seqs (2,048). Resident memory follows
    # the cells in use, not this (engines/llamacpp/zero_pages.py).
    ctx_size: int = 135168
    # 64 sequences of batch work decoded together, and two kept for realtime requests: on two
    # cores 64 at once ran a 64-request batch 1.6x faster than 30 (bench/RESULTS.md).
    max_seqs: int = 66
    prefix_sharing: bool = True
    # Keep a finished sequence's KV in its slot, for later prompts that start the same way.
    prefix_cache: bool = True
    # The prefix cache's memory budget: KV cells it keeps in all (16,384: 377 MB at f16 for the
    # bundled model), least recently used going first.
    prefix_cache_cells: int = Field(default=16384, ge=0)
    # The embedded engine's KV cache element type: q8_0 takes half the memory of f16.
    kv_type: Literal["f16", "q8_0"] = "f16"
    engine: Literal["llamacpp", "fake"] = "llamacpp"  # "fake" is for scheduler tests only
    # While the embedded engine decodes batch work (no realtime request running or recent),
    # the event loop wakes at most this often, serving what arrived meanwhile in one go: the
    # API's wake-ups then cost the batch 2-8% instead of 11-20% under 200 pollers on 2 cores,
    # and a poll takes ~30 ms instead of ~1 ms (loop_pacing.py). 0: answer everything at once.
    loop_pacing_ms: float = Field(default=20.0, ge=0, le=1000)
    fake_step_seconds: float = 0.01  # the fake engine's time per token (0: instant)

    # Limits (OpenAI's defaults; all configurable).
    max_upload_bytes: int = 200 * MIB
    max_batch_lines: int = 50_000
    max_line_bytes: int = 10 * MIB
    max_validation_errors: int = 100  # errors.data entries kept per failed batch
    # Anthropic Message Batches (Anthropic's defaults): requests per batch, and create-body size.
    anthropic_max_batch_requests: int = 100_000
    anthropic_max_body_bytes: int = 256 * MIB

    # Per-tenant admission (429 with Retry-After beyond them): batches not yet ended, and
    # requests queued or running across them. One tenant cannot fill the queue for all.
    max_active_batches_per_tenant: int = 100
    max_queued_requests_per_tenant: int = 1_000_000
    # A request body (upload or JSON) that sends nothing for this long is abandoned with a 408:
    # a client that stalls mid-upload must not hold a connection, a blob or memory forever.
    body_idle_timeout_seconds: float = 60
    # JSON bodies nested deeper than this are refused (no chat or batch body needs more).
    max_json_depth: int = 64
    # A request's head (request line and headers) larger than this, or with more headers, is
    # refused with a 431 while it arrives, before authentication reads it. The SDKs send ~1 KB.
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    max_headers: int = Field(default=100, ge=16)

    # Retention (see service/retention.py): how often it runs, and how long ended batches keep their
    # prompts and results (OpenAI: after ending, like the 30-day result files; Anthropic:
    # after creation, 29 days like Anthropic's results).
    retention_interval_seconds: float = 3600
    batch_data_retention_seconds: int = 30 * 24 * 3600
    anthropic_results_retention_seconds: int = 29 * 24 * 3600
    # How long an OpenAI batch input file lives after upload before retention deletes it
    # (never while a batch that reads it is running), and its output and error files after
    # they are written (scheduler/finalize.py); uploads of other purposes do not expire.
    file_retention_seconds: int = Field(default=30 * 24 * 3600, ge=1)
    # For tests only: the least ``seconds`` an upload's ``expires_after`` or a batch's
    # ``output_expires_after`` may ask for (OpenAI's, and the default: 3,600).
    min_expires_after_seconds: int = Field(default=3600, ge=1, le=2_592_000)

    # Prices per million tokens (costs/prices.py): realtime input, cached input and output,
    # and batch prices as this share of them; a prices file (TOML) overrides them per model.
    price_input: float = Field(default=0.10, ge=0)
    price_cached_input: float = Field(default=0.05, ge=0)
    price_output: float = Field(default=0.40, ge=0)
    batch_discount: float = Field(default=0.5, gt=0, le=1)
    prices_file: Path | None = None

    # Webhooks (service/webhook_sender.py). URLs must be https, and resolve to public
    # addresses, except for these hosts (comma-separated names or IPs, e.g. 127.0.0.1 in tests).
    webhook_allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    # A failed delivery is tried again after base x 2^attempts (at most an hour between two),
    # for this long after the event; then it is given up and shows failed.
    webhook_retry_base_seconds: float = Field(default=5.0, gt=0)
    webhook_retry_window_seconds: int = Field(default=24 * 3600, ge=1)
    webhook_endpoints_per_tenant: int = Field(default=16, ge=1)

    # Scheduling.
    lease_seconds: int = 60
    # A realtime request at service_tier "flex" not answered within this long gets a 429
    # (below the OpenAI SDK's default 600 s client timeout).
    flex_timeout_seconds: float = Field(default=540.0, gt=0, le=86400)
    # The most output tokens a realtime request may ask for (unset: the model's context, as
    # for batch lines, which this never limits).
    realtime_max_tokens: int | None = Field(default=None, ge=1)
    # Prompt + completion of a realtime request on the embedded engine at most this (unset:
    # the model's context per sequence, as for batch lines, which this never limits).
    realtime_max_context_tokens: int | None = Field(default=None, ge=2)
    # Fair share across tenants counts the tokens each used over this many seconds.
    fair_share_window_seconds: int = Field(default=300, ge=10, le=3600)
    poll_interval_seconds: float = 0.5
    # On SIGTERM a worker stops leasing and gives the requests in hand this long to finish
    # before handing the rest back to the queue.
    shutdown_grace_seconds: float = 30.0
    # A worker's Prometheus endpoint (it has no HTTP API); api/serve use GET /metrics.
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    # Nice value for the threads that validate uploads and write result files (0: don't).
    background_nice: int = 19

    @field_validator("api_keys", "models", "webhook_allow_hosts", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def database_path(self) -> Path:
        return self.data_dir / "batchd.sqlite3"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys) or self.keys_file is not None
