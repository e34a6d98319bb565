"""The price table: defaults from the settings, per-model overrides from a prices file, batch
prices from the discount unless given, and a wrong file refused with its key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchd.costs.cost import ModelUsage, cost_of, priced
from batchd.costs.prices import Price, load_price_table
from batchd.errors import ConfigError

DEFAULTS = {"input": 0.10, "cached_input": 0.05, "output": 0.40, "batch_discount": 0.5}


def test_without_a_file_every_model_gets_the_defaults_and_batch_is_discounted() -> None:
    table = load_price_table(None, **DEFAULTS)
    prices = table.of("any-model")
    assert prices.realtime == Price(0.10, 0.05, 0.40)
    assert prices.batch == Price(0.05, 0.025, 0.20)


def test_a_model_table_overrides_what_it_names_and_explicit_batch_prices_win(
    tmp_path: Path,
) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(
        'currency = "EUR"\n[default]\noutput = 1.0\n'
        "[models.big]\ninput = 2.0\nbatch_input = 0.5\nbatch_discount = 0.25\n"
    )
    table = load_price_table(path, **DEFAULTS)
    assert table.currency == "EUR"
    assert table.of("small").realtime == Price(0.10, 0.05, 1.0)  # the file's default output
    big = table.of("big")
    assert big.realtime == Price(2.0, 0.05, 1.0)
    assert big.batch == Price(0.5, 0.05 * 0.25, 1.0 * 0.25)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[models.x]\ninptu = 1\n", "models.x.inptu"),
        ("[default]\noutput = -1\n", "default.output"),
        ("[default]\nbatch_discount = 2\n", "default.batch_discount"),
        ("not toml = = 1", "not valid TOML"),
    ],
)
def test_a_wrong_file_is_refused_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_price_table(path, **DEFAULTS)


def test_cached_prompt_tokens_are_priced_at_the_cached_price() -> None:
    price = Price(input=1.0, cached_input=0.1, output=2.0)
    usage = ModelUsage("m", input_tokens=1_000_000, cached_tokens=400_000, output_tokens=500_000)
    assert priced(usage, price) == pytest.approx(0.6 * 1.0 + 0.4 * 0.1 + 0.5 * 2.0)


def test_cost_sums_models_at_their_own_prices_and_saving_is_realtime_less_batch(
    tmp_path: Path,
) -> None:
    path = tmp_path / "prices.toml"
    path.write_text("[models.big]\ninput = 10.0\noutput = 10.0\n")
    table = load_price_table(path, **DEFAULTS)
    cost = cost_of(
        [ModelUsage("big", 1_000_000, 0, 0), ModelUsage("small", 0, 0, 1_000_000)], table
    )
    assert cost.realtime == pytest.approx(10.0 + 0.40)
    assert cost.batch == pytest.approx(5.0 + 0.20)
    wire = cost.to_wire()
    assert wire["saving"] == pytest.approx(5.2)
    assert wire["saving_percent"] == 50.0


def test_no_usage_costs_nothing_and_saves_nothing() -> None:
    wire = cost_of([], load_price_table(None, **DEFAULTS)).to_wire()
    assert wire == {
        "currency": "USD",
        "batch": 0.0,
        "realtime": 0.0,
        "saving": 0.0,
        "saving_percent": 0.0,
    }
