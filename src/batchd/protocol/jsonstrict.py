"""Checks orjson does not make: duplicate keys, and nesting depth.

A JSON object that names one key twice is ambiguous: parsers disagree on which value wins
(orjson and the stdlib keep the last, others the first), so a request could mean one thing to
a proxy in front of us and another to us. We refuse such input instead of picking a winner.

orjson, which does all our parsing, cannot report duplicates, so this is a second, stricter
pass with the stdlib's C scanner; it runs only on input orjson already accepted.
"""

from __future__ import annotations

import json
from typing import Any


class DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return result


_DECODER = json.JSONDecoder(object_pairs_hook=_refuse_duplicates)


def duplicate_key(raw: bytes | bytearray | str) -> str | None:
    """The first key some object in ``raw`` names twice, or None. ``raw`` must be valid JSON."""
    text = raw.decode("utf-8") if isinstance(raw, bytes | bytearray) else raw
    try:
        _DECODER.decode(text)
    except DuplicateKey as exc:
        return exc.key
    return None


def nesting_depth(value: Any) -> int:
    """How many levels of arrays and objects ``value`` nests: 0 for a scalar, 1 for ``[]``
    or ``{"a": 1}``, 2 for ``{"a": [1]}``. Iterative, so no depth exhausts the stack."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest
