"""Service tiers, rule by rule: which tier a body is served at, and what that changes."""

from __future__ import annotations

import time

import pytest

from batchd.engines.base import (
    ChatMessage,
    ForwardRequest,
    GenerationRequest,
    Priority,
    SamplingParams,
)
from batchd.errors import InvalidRequest
from batchd.inference.service_tiers import apply_tier, flex_timed_out, served_tier

REQUEST = GenerationRequest(
    model="m",
    params=SamplingParams(max_tokens=4),
    messages=(ChatMessage("user", "hi"),),
    priority=Priority.REALTIME,
)


@pytest.mark.parametrize(
    ("asked", "allowed", "served"),
    [
        (None, True, "default"),
        ("auto", True, "default"),
        ("default", True, "default"),
        ("scale", True, "default"),
        ("flex", False, "flex"),
        ("priority", True, "priority"),
        ("priority", False, "default"),  # not allowed: served, and said, at default
    ],
)
def test_the_tier_served(asked: str | None, allowed: bool, served: str) -> None:
    body = {"model": "m"} if asked is None else {"model": "m", "service_tier": asked}
    assert served_tier(body, priority_allowed=allowed) == served


@pytest.mark.parametrize("value", ["turbo", 3, "", ["flex"]])
def test_an_unknown_tier_is_a_400_naming_the_field(value: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        served_tier({"service_tier": value}, priority_allowed=True)
    assert caught.value.param == "service_tier"
    assert "'auto', 'default', 'flex', 'scale' and 'priority'" in caught.value.message


def test_priority_is_urgent_realtime_and_flex_is_batch_work_with_a_deadline() -> None:
    assert apply_tier(REQUEST, "default", 60) == REQUEST
    urgent = apply_tier(REQUEST, "priority", 60)
    assert urgent.urgent and urgent.priority is Priority.REALTIME
    before = time.time()
    flex = apply_tier(REQUEST, "flex", 60)
    assert flex.priority is Priority.BATCH and not flex.urgent
    assert flex.deadline is not None and before + 59 <= flex.deadline <= time.time() + 61
    # An upstream's request: flex retries like a batch row until the deadline.
    forwarded = ForwardRequest("m", "/v1/chat/completions", {}, Priority.REALTIME)
    assert apply_tier(forwarded, "flex", 60).priority is Priority.BATCH
    assert apply_tier(forwarded, "priority", 60) == forwarded


def test_a_flex_timeout_is_a_429_resource_unavailable_that_says_what_to_do() -> None:
    error = flex_timed_out(2.5)
    assert (error.status_code, error.code, error.param) == (
        429,
        "resource_unavailable",
        "service_tier",
    )
    assert "2.5 s" in error.message and "default service tier" in error.message
