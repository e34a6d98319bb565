"""The cost of token usage at batch and at realtime prices, and the saving between them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from batchd.costs.prices import Price, PriceTable

MILLION = 1_000_000


@dataclass(frozen=True, slots=True)
class ModelUsage:
    model: str | None
    input_tokens: int  # all prompt tokens, the cached ones included (as usage reports them)
    cached_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Cost:
    currency: str
    batch: float
    realtime: float

    @property
    def saving(self) -> float:
        return self.realtime - self.batch

    def to_wire(self) -> dict[str, Any]:
        saving = self.saving
        return {
            "currency": self.currency,
            "batch": round(self.batch, 6),
            "realtime": round(self.realtime, 6),
            "saving": round(saving, 6),
            "saving_percent": round(100 * saving / self.realtime, 1) if self.realtime else 0.0,
        }


def priced(usage: ModelUsage, price: Price) -> float:
    """What ``usage`` costs at ``price``: cached prompt tokens at the cached price, the rest
    of the prompt at the input price, generated tokens at the output price."""
    cached = min(usage.cached_tokens, usage.input_tokens)
    uncached = usage.input_tokens - cached
    return (
        uncached * price.input + cached * price.cached_input + usage.output_tokens * price.output
    ) / MILLION


def cost_of(usages: Iterable[ModelUsage], table: PriceTable) -> Cost:
    batch = realtime = 0.0
    for usage in usages:
        prices = table.of(usage.model)
        batch += priced(usage, prices.batch)
        realtime += priced(usage, prices.realtime)
    return Cost(table.currency, batch, realtime)
