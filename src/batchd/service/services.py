"""The parts a process serves with (``Services``), and the small things every use case may need
of them: waking the scheduler, noting realtime traffic, installing the process's gauges."""

from __future__ import annotations

from dataclasses import dataclass, field

from batchd import metrics
from batchd.blobs.base import BlobStore
from batchd.config import Settings
from batchd.costs.prices import PriceTable, load_price_table
from batchd.engines.base import Engine
from batchd.loop_pacing import REALTIME_HOLD_SECONDS, LoopPacer
from batchd.scheduler.runner import Scheduler
from batchd.store.store import Store


@dataclass
class Services:
    settings: Settings
    store: Store
    blobs: BlobStore
    engine: Engine
    scheduler: Scheduler | None  # None in an API-only process (`batchd api`)
    # Moderates the loop's wake-ups while the embedded engine decodes batch work; set by
    # ``runtime.running`` where that applies (loop_pacing.py).
    pacer: LoopPacer | None = None
    # What tokens cost (costs/prices.py); built from the settings unless given.
    prices: PriceTable = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.prices is None:
            self.prices = price_table(self.settings)


def price_table(settings: Settings) -> PriceTable:
    """The price table the settings describe; ConfigError for a prices file that is wrong."""
    return load_price_table(
        settings.prices_file,
        input=settings.price_input,
        cached_input=settings.price_cached_input,
        output=settings.price_output,
        batch_discount=settings.batch_discount,
    )


def install_metrics(services: Services) -> None:
    """This process's Prometheus gauges: the shared queue's depth, and (in a process that
    runs the scheduler) the leases it holds."""
    scheduler = services.scheduler
    metrics.install_process_gauges(
        request_states=services.store.request_state_counts,
        batch_statuses=services.store.batch_status_counts,
        leases_held=scheduler.leases_held if scheduler is not None else None,
    )


def note_realtime(services: Services) -> None:
    """A realtime request arrived: the loop serves everything at once for a while, whichever
    engine answers it (the embedded one also tells the pacer itself)."""
    if services.pacer is not None:
        services.pacer.hold(REALTIME_HOLD_SECONDS)


def wake_scheduler(services: Services) -> None:
    """Start new work now rather than at the next poll, when this process runs the scheduler
    (an API-only process has none: the workers find the work on their next poll).

    On the event loop's thread only: the scheduler's wake-up is an ``asyncio.Event``, which
    is not thread-safe. The use cases run in a worker thread and never call this; the route
    calls it once the use case has returned."""
    if services.scheduler is not None:
        services.scheduler.wake()
