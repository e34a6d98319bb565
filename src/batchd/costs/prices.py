"""The price table: per model, what a million tokens cost in realtime and in a batch.

batchd serves the operator's own hardware, so these prices are whatever the operator charges
(or wants their teams to see) for it; the defaults only make the saving visible out of the
box. Defaults come from the settings (``BATCHD_PRICE_INPUT`` and friends, per million tokens,
batch prices ``BATCHD_BATCH_DISCOUNT`` of the realtime ones); a prices file
(``BATCHD_PRICES_FILE``, TOML) overrides them per model:

    currency = "USD"

    [default]                  # every model without a table of its own
    input = 0.10               # per million uncached prompt tokens, realtime
    cached_input = 0.05        # per million prompt tokens read from a cache, realtime
    output = 0.40              # per million generated tokens, realtime
    batch_discount = 0.5       # batch price = realtime price x this, unless given below

    [models.llama-8b]
    input = 0.20
    output = 0.80
    batch_input = 0.08         # explicit batch prices win over the discount
    batch_output = 0.30

A key that is misspelt or a price below zero stops start-up with the key named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from batchd.errors import ConfigError
from batchd.toml_files import load_validated


@dataclass(frozen=True, slots=True)
class Price:
    """Per million tokens."""

    input: float
    cached_input: float
    output: float


@dataclass(frozen=True, slots=True)
class ModelPrices:
    realtime: Price
    batch: Price


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Entry(_Strict):
    input: float | None = Field(default=None, ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    output: float | None = Field(default=None, ge=0)
    batch_discount: float | None = Field(default=None, gt=0, le=1)
    batch_input: float | None = Field(default=None, ge=0)
    batch_cached_input: float | None = Field(default=None, ge=0)
    batch_output: float | None = Field(default=None, ge=0)


class _File(_Strict):
    currency: str = Field(default="USD", min_length=1, max_length=8)
    default: _Entry = _Entry()
    models: dict[str, _Entry] = {}


def _resolve(entry: _Entry, base: _Entry) -> ModelPrices:
    """An entry's prices, anything it leaves out taken from ``base`` (the default entry, itself
    complete): realtime first, then batch from explicit prices or the discount."""
    realtime = Price(
        input=entry.input if entry.input is not None else base.input or 0.0,
        cached_input=(
            entry.cached_input if entry.cached_input is not None else base.cached_input or 0.0
        ),
        output=entry.output if entry.output is not None else base.output or 0.0,
    )
    discount = entry.batch_discount or base.batch_discount or 1.0

    def batch(explicit: float | None, realtime_price: float) -> float:
        return explicit if explicit is not None else realtime_price * discount

    return ModelPrices(
        realtime=realtime,
        batch=Price(
            input=batch(entry.batch_input, realtime.input),
            cached_input=batch(entry.batch_cached_input, realtime.cached_input),
            output=batch(entry.batch_output, realtime.output),
        ),
    )


class PriceTable:
    """Prices of every model: its own table if it has one, else the default."""

    def __init__(
        self, default: ModelPrices, per_model: dict[str, ModelPrices], currency: str = "USD"
    ) -> None:
        self.default = default
        self.per_model = per_model
        self.currency = currency

    def of(self, model: str | None) -> ModelPrices:
        if model is None:
            return self.default
        return self.per_model.get(model, self.default)

    def describe(self) -> dict[str, Any]:
        """The table as JSON (the console shows it beside the costs)."""

        def prices(p: ModelPrices) -> dict[str, Any]:
            return {
                "realtime": {
                    "input": p.realtime.input,
                    "cached_input": p.realtime.cached_input,
                    "output": p.realtime.output,
                },
                "batch": {
                    "input": p.batch.input,
                    "cached_input": p.batch.cached_input,
                    "output": p.batch.output,
                },
            }

        return {
            "currency": self.currency,
            "per": "1M tokens",
            "default": prices(self.default),
            "models": {name: prices(p) for name, p in sorted(self.per_model.items())},
        }


def parse(text: str, *, source: str, defaults: _Entry) -> PriceTable:
    parsed = load_validated(text, source=source, model=_File)
    base = defaults.model_copy(
        update={k: v for k, v in parsed.default.model_dump().items() if v is not None}
    )
    return PriceTable(
        _resolve(base, base),
        {name: _resolve(entry, base) for name, entry in parsed.models.items()},
        parsed.currency,
    )


def load_price_table(
    path: Path | None,
    *,
    input: float,
    cached_input: float,
    output: float,
    batch_discount: float,
) -> PriceTable:
    """The table from the settings' defaults and, when given, the prices file."""
    defaults = _Entry(
        input=input, cached_input=cached_input, output=output, batch_discount=batch_discount
    )
    if path is None:
        return PriceTable(_resolve(defaults, defaults), {})
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read prices file {path}: {exc}") from None
    return parse(text, source=str(path), defaults=defaults)
