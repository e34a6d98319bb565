"""Limits that hold for realtime requests only: a batch line may ask for more.

Anthropic lets a batch's messages ask for more output than a realtime call may; batchd does
the same with ``BATCHD_REALTIME_MAX_TOKENS``: a realtime request asking for more output
tokens than that is refused with a 400 naming the field, while the same body in a batch runs
up to the model's own context. Unset (the default), realtime requests are bounded only by the
model, as batch lines are.
"""

from __future__ import annotations

from typing import Any

from batchd.errors import InvalidRequest

# The fields that bound a response's output, on every surface: OpenAI chat (either name),
# completions and responses, and Anthropic messages.
OUTPUT_LIMIT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def check_realtime_output(body: Any, limit: int | None) -> None:
    """A 400 naming the field when ``body`` asks for more output tokens than ``limit``."""
    if limit is None or not isinstance(body, dict):
        return
    for field in OUTPUT_LIMIT_FIELDS:
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            raise InvalidRequest(
                f"{field} is {value}, but realtime requests on this server may ask for at most"
                f" {limit} output tokens. Send it in a batch, where the limit is the model's"
                " context, or ask for fewer.",
                param=field,
            )
