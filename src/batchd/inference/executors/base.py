"""What every batch executor shares: the context a row runs in, and an executor's signature."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from batchd.engines.base import Engine
from batchd.store.records import RequestOutcome


@dataclass(frozen=True, slots=True)
class RunContext:
    """What the scheduler knows about a row beyond its body."""

    deadline: float | None = None  # the batch's expires_at (epoch seconds)
    prior_attempts: int = 0  # upstream attempts made under earlier leases


# (engine, endpoint, stored body, context) -> the outcome to commit. An executor returns an
# errored outcome for a body only execution can judge wrong (its siblings are unaffected) and
# lets ``RetryLater`` through, its attempts counted from the row's first lease.
Executor = Callable[[Engine, str, bytes, RunContext], Awaitable[RequestOutcome]]
