"""Service tiers of realtime OpenAI requests (``service_tier`` on chat completions, completions
and responses), as OpenAI defines them:

- ``default`` (and ``auto``, and ``scale``, which has no meaning here): a realtime request,
  admitted ahead of batch work.
- ``priority``: ahead of ``default`` requests too, for tenants allowed it (the keys file's
  ``priority`` flag; see api/keyring.py). A tenant that is not allowed it is served at
  ``default``, and the response says so, as OpenAI does.
- ``flex``: served from batch capacity at batch priority, so it waits behind realtime work,
  but answered in the same HTTP call. One that has not finished within the flex timeout is
  ended and answered 429 ``resource_unavailable``, as OpenAI answers a flex request it has no
  capacity for; nothing is charged, and the client may retry.

The response's ``service_tier`` is the tier that served the request.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Literal

from batchd.engines.base import ForwardRequest, GenerationRequest, Priority
from batchd.errors import InvalidRequest, LimitExceeded

Tier = Literal["default", "flex", "priority"]
ACCEPTED = ("auto", "default", "flex", "scale", "priority")


class FlexUnavailable(LimitExceeded):
    default_code = "resource_unavailable"
    openai_type = "invalid_request_error"


def served_tier(body: Any, priority_allowed: bool) -> Tier:
    """The tier a realtime body is served at; a 400 naming ``service_tier`` for a value that
    is not one of OpenAI's."""
    value = body.get("service_tier") if isinstance(body, dict) else None
    if value is None:
        return "default"
    if not isinstance(value, str) or value not in ACCEPTED:
        raise InvalidRequest(
            f"Invalid value for 'service_tier': {str(value)[:100]!r}. Supported values are:"
            " 'auto', 'default', 'flex', 'scale' and 'priority'.",
            param="service_tier",
        )
    if value == "flex":
        return "flex"
    if value == "priority" and priority_allowed:
        return "priority"
    return "default"


def apply_tier(request: GenerationRequest | ForwardRequest, tier: Tier, flex_timeout: float) -> Any:
    """``request`` as its tier runs it: ``priority`` urgent among realtime requests, ``flex``
    at batch priority with its timeout as the deadline (an upstream engine retries until
    then, as for a batch row)."""
    if tier == "priority" and isinstance(request, GenerationRequest):
        return replace(request, urgent=True)
    if tier == "flex":
        return replace(request, priority=Priority.BATCH, deadline=time.time() + flex_timeout)
    return request


def flex_timed_out(flex_timeout: float) -> FlexUnavailable:
    return FlexUnavailable(
        f"This flex request did not finish within {flex_timeout:g} s: batch capacity was busy."
        " Retry later, or send it at the default service tier.",
        param="service_tier",
        retry_after=max(1, int(flex_timeout // 10)),
    )
