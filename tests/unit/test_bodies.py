from __future__ import annotations

from typing import Any

import pytest

from batchd.api.json_body import check_depth
from batchd.errors import InvalidRequest


def nested(levels: int) -> Any:
    value: Any = "leaf"
    for level in range(levels):
        value = [value] if level % 2 else {"k": value}
    return value


def test_depth_up_to_the_limit_passes_and_beyond_is_refused_naming_the_limit() -> None:
    assert check_depth(nested(64), 64) == nested(64)
    assert check_depth({"a": 1, "b": [1, 2, {"c": None}]}, 3)
    with pytest.raises(InvalidRequest) as excinfo:
        check_depth(nested(65), 64)
    assert "more than 64 levels" in excinfo.value.message and excinfo.value.param == "body"
    with pytest.raises(InvalidRequest):
        check_depth(nested(100_000), 64)  # iterative: no RecursionError however deep
