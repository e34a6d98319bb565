"""Tables. Portable SQL only (SQLite now, PostgreSQL later); Alembic migrations mirror this.

Request rows are the unit of work (see DESIGN.md): each moves
``pending -> running -> succeeded | errored | canceled | expired`` and its result is written in
the same statement that makes it final.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

files = Table(
    "files",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("tenant", String(64), nullable=False),
    Column("filename", Text, nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=True),
    Column("blob", String(128), nullable=False),  # server-generated name under files/
    Index("ix_files_tenant_seq", "tenant", "seq"),
)

batches = Table(
    "batches",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("tenant", String(64), nullable=False),
    Column("surface", String(16), nullable=False),  # "openai" | "anthropic"
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(64), nullable=True),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("model", Text, nullable=True),
    Column("errors", Text, nullable=True),  # JSON list of BatchError
    Column("metadata", Text, nullable=True),  # JSON object
    Column("output_file_id", String(64), nullable=True),
    Column("error_file_id", String(64), nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("in_progress_at", BigInteger, nullable=True),
    Column("expires_at", BigInteger, nullable=False),
    Column("finalizing_at", BigInteger, nullable=True),
    Column("completed_at", BigInteger, nullable=True),
    Column("failed_at", BigInteger, nullable=True),
    Column("expired_at", BigInteger, nullable=True),
    Column("cancelling_at", BigInteger, nullable=True),
    Column("cancelled_at", BigInteger, nullable=True),
    # Set by retention once the rows' bodies and results are dropped (Anthropic: archived_at).
    Column("archived_at", BigInteger, nullable=True),
    # The worker validating the batch, and until when (migration 0004).
    Column("claim_owner", String(64), nullable=True),
    Column("claim_expires_at", BigInteger, nullable=True),
    # Seconds the output and error files are kept once written: output_expires_after (0007).
    Column("output_expires_after", BigInteger, nullable=True),
    Index("ix_batches_tenant_seq", "tenant", "seq"),
    Index("ix_batches_status", "status"),
)

requests = Table(
    "requests",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("batch_id", String(64), nullable=False),
    Column("line_no", Integer, nullable=False),
    Column("custom_id", Text, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("prefix_key", String(32), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_expires_at", BigInteger, nullable=True),
    Column("lease_epoch", Integer, nullable=False, default=0),
    Column("status_code", Integer, nullable=True),
    Column("result", LargeBinary, nullable=True),  # response body, or the error object
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("cached_tokens", Integer, nullable=True),
    Column("finished_at", BigInteger, nullable=True),
    # The body's model, so leasing can skip models whose engine is full or upstream down.
    Column("model", Text, nullable=True),
    # HTTP attempts an upstream engine made for this row, across every lease of it.
    Column("upstream_attempts", Integer, nullable=False, default=0, server_default="0"),
    UniqueConstraint("batch_id", "custom_id", name="uq_requests_batch_custom_id"),
    # Also carries the token columns: a batch's counts and usage come from the index alone.
    Index(
        "ix_requests_batch_state_tokens",
        "batch_id",
        "state",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
    ),
    Index("ix_requests_batch_line", "batch_id", "line_no"),
    # Leasing: a batch's pending rows in prompt-prefix order, read as an index range.
    Index("ix_requests_lease_order", "batch_id", "state", "prefix_key", "line_no"),
    Index("ix_requests_state_prefix", "state", "prefix_key"),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("scope", String(32), primary_key=True),  # which create: "files", "batches", ...
    Column("key", String(255), primary_key=True),
    Column("fingerprint", String(64), nullable=False),  # sha256 of the request's content
    Column("object_id", String(64), nullable=True),  # None while the first request runs
    Column("created_at", BigInteger, nullable=False),
)

# Fair share (fair_share.py): each tenant's weight, as the keys file gives it (a tenant with
# no row weighs 1), written by whichever process reads the keys file, read by every worker.
tenant_weights = Table(
    "tenant_weights",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("weight", Float, nullable=False),
)

# The engine tokens and rows each tenant's batch work finished, per bucket of
# fair_share.BUCKET_SECONDS (``bucket`` is its start, epoch seconds): leasing reads the recent
# window of it, and buckets older than any window are deleted as new ones are written.
tenant_usage = Table(
    "tenant_usage",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("bucket", BigInteger, primary_key=True),
    Column("tokens", BigInteger, nullable=False),
    Column("rows", Integer, nullable=False),
)

# Upstream limits for the whole deployment (upstream_budget.py): an upstream's concurrency
# slots, each leased to the process attempting a request through it, and its rate buckets.
# ``key`` names the model, its URL and the limit. Times are epoch seconds.
upstream_slots = Table(
    "upstream_slots",
    metadata,
    Column("key", String(300), primary_key=True),
    Column("slot", Integer, primary_key=True),
    Column("holder", String(64), nullable=True),
    Column("expires_at", Float, nullable=True),
)

upstream_rates = Table(
    "upstream_rates",
    metadata,
    Column("key", String(300), primary_key=True),
    Column("level", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# Webhooks (store/webhooks.py): each tenant's endpoints, and the outbox of events to deliver,
# one row per event and endpoint, written in the transaction that ends the batch.
webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("tenant", String(64), nullable=False),
    Column("name", Text, nullable=False),
    Column("url", Text, nullable=False),
    Column("events", Text, nullable=False),  # JSON list of event types
    Column("secret", String(128), nullable=False),  # whsec_<base64>: signs every delivery
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Index("ix_webhook_endpoints_tenant", "tenant", "seq"),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False),  # evt_…: the webhook-id header
    Column("endpoint_id", String(64), nullable=False),
    Column("tenant", String(64), nullable=False),
    Column("type", String(64), nullable=False),
    Column("payload", LargeBinary, nullable=False),  # the body sent, the same every attempt
    Column("created_at", BigInteger, nullable=False),
    Column("state", String(16), nullable=False),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("last_attempt_at", Float, nullable=True),
    Column("last_status", Integer, nullable=True),  # the receiver's HTTP status, if any
    Column("last_error", Text, nullable=True),  # a short excerpt: never the whole body
    Column("delivered_at", Float, nullable=True),
    UniqueConstraint("event_id", "endpoint_id", name="uq_webhook_deliveries_event_endpoint"),
    Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
    Index("ix_webhook_deliveries_endpoint", "endpoint_id", "seq"),
)

# One row per job that must run on a single process at a time across the deployment (the
# webhook sender): who holds it, until when.
singleton_leases = Table(
    "singleton_leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(64), nullable=True),
    Column("expires_at", Float, nullable=True),
)
