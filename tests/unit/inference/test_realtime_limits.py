"""The realtime output limit: which fields it reads, and the 400 it answers."""

from __future__ import annotations

import pytest

from batchd.errors import InvalidRequest
from batchd.inference.realtime_limits import check_realtime_output


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "max_output_tokens"])
def test_asking_for_more_than_the_limit_is_a_400_naming_the_field(field: str) -> None:
    check_realtime_output({field: 64}, limit=64)  # at the limit: fine
    with pytest.raises(InvalidRequest) as caught:
        check_realtime_output({field: 65}, limit=64)
    assert caught.value.param == field
    assert "at most 64 output tokens" in caught.value.message
    assert "batch" in caught.value.message


def test_no_limit_and_odd_bodies_pass_through_to_the_body_checks() -> None:
    check_realtime_output({"max_tokens": 10**9}, limit=None)
    check_realtime_output(["not", "a", "body"], limit=8)
    check_realtime_output({"max_tokens": "lots", "max_output_tokens": True}, limit=8)
