"""Reading a TOML settings file into a pydantic model, with errors an operator can act on:
the file and the TOML line, or the file and the offending key (``models.x.max_concurrency``).
The model registry (engines/registry.py) and the prices file (costs/prices.py) both read
theirs through this."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from batchd.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def dotted(loc: tuple[Any, ...]) -> str:
    """Pydantic's error location as a dotted key."""
    return ".".join(str(part) for part in loc)


def load_validated(
    text: str,
    *,
    source: str,
    model: type[M],
    key: Callable[[tuple[Any, ...]], str] = dotted,
) -> M:
    """``text`` parsed and validated as ``model``; ConfigError naming ``source`` and the TOML
    position, or the first invalid key as ``key`` spells it."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message carries "(at line N, column M)".
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = key(tuple(first["loc"])) or "(top level)"
        raise ConfigError(f"{source}: {name}: {first['msg']}") from None
