"""The Store: every database operation batchd performs, as named methods on one object.

Each group of methods lives in a module of its own, as a mixin over the same engine:

- files.py: file rows (create, get, list, delete)
- batches.py: reading batches with their counts, transitions, finalizing
- admission.py: a tenant's load, and creating a batch within its limits under its lock
- queue.py: request rows inserted, leased, renewed, completed, released and ended
- stats.py: counts and usage, per batch (cached for pollers) and over the database
- console_reads.py: the console's views (batches of both surfaces, failures, queue by tenant)
- retention.py: expired files, archiving, orphan rows, old idempotency keys
- idempotency.py: looking up a create's key (recording it is part of each create)
- tenants.py: tenants' weights and recent usage, which leasing shares the engine by
- upstream_budget.py: upstream concurrency slots and rate buckets for the whole deployment
- webhooks.py: webhook endpoints, the outbox of deliveries, the one-sender lease
- retry_reads.py: what retrying a batch reads (its failed rows) and sets (its metadata)

The store depends on nothing of batchd's but the clock, the errors, the failpoints and its
own modules, so the layers above it (protocol, scheduler, service, api) can all use it.
"""

from __future__ import annotations

from sqlalchemy import Engine

from batchd.store import poll_reads
from batchd.store.admission import AdmissionMixin
from batchd.store.batches import BatchesMixin
from batchd.store.console_reads import ConsoleReadsMixin
from batchd.store.files import FilesMixin
from batchd.store.idempotency import IdempotencyMixin
from batchd.store.queue import QueueMixin
from batchd.store.retention import RetentionMixin
from batchd.store.retry_reads import RetryReadsMixin
from batchd.store.stats import BatchStats, StatsMixin
from batchd.store.tenants import TenantsMixin
from batchd.store.upstream_budget import UpstreamBudgetMixin
from batchd.store.webhooks import WebhooksMixin


class Store(
    FilesMixin,
    BatchesMixin,
    AdmissionMixin,
    QueueMixin,
    StatsMixin,
    ConsoleReadsMixin,
    RetentionMixin,
    RetryReadsMixin,
    IdempotencyMixin,
    TenantsMixin,
    UpstreamBudgetMixin,
    WebhooksMixin,
):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # The pollers' reads of get_batch and list_batches (see poll_reads.ReadConnections).
        self._reads = poll_reads.ReadConnections(engine)
        # Counts and usage attached to the batches read, through the pollers' caches.
        self._stats = BatchStats(engine)
