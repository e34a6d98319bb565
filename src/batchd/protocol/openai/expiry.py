"""OpenAI's expiration policies: a file upload's ``expires_after`` (multipart form fields
``expires_after[anchor]`` and ``expires_after[seconds]``) and a batch create's
``output_expires_after`` (a JSON object). Both are ``{"anchor": "created_at", "seconds": n}``
with ``n`` from 3,600 (one hour) to 2,592,000 (30 days); anything else is a 400 naming the
field. The least ``seconds`` is the caller's to lower (a test setting)."""

from __future__ import annotations

from batchd.errors import InvalidRequest

MIN_SECONDS = 3600
MAX_SECONDS = 2_592_000
ANCHOR = "created_at"
_KEYS = ("anchor", "seconds")


def form_expires_after(fields: dict[str, str]) -> dict[str, object] | None:
    """The ``expires_after`` object of an upload form, as the SDKs send it (one field per key,
    ``expires_after[anchor]`` and ``expires_after[seconds]``); None when the form has none.
    A key the policy does not have, or the object sent whole as one field, is refused."""
    sent = {name: value for name, value in fields.items() if name.startswith("expires_after")}
    if not sent:
        return None
    policy: dict[str, object] = {}
    for name, value in sent.items():
        key = name[len("expires_after[") : -1] if name.endswith("]") else None
        if not name.startswith("expires_after[") or key not in _KEYS:
            raise InvalidRequest(
                f"Unknown form field {name[:80]!r}: send expires_after[anchor] and"
                " expires_after[seconds].",
                param=name[:80],
            )
        policy[key] = int(value) if key == "seconds" and value.strip().isdigit() else value
    return policy


def parse_expires_after(
    value: object, *, field: str, min_seconds: int = MIN_SECONDS, form: bool = False
) -> int | None:
    """The policy's ``seconds``, or None when ``value`` is None (not sent). ``field`` names the
    policy in errors; ``form``: its keys are named ``field[key]`` (a multipart form) rather
    than ``field.key`` (JSON)."""
    if value is None:
        return None

    def name(key: str) -> str:
        return f"{field}[{key}]" if form else f"{field}.{key}"

    if not isinstance(value, dict):
        raise InvalidRequest(f"{field} must be an object with 'anchor' and 'seconds'.", param=field)
    for key in value:
        if key not in _KEYS:
            raise InvalidRequest(
                f"Unknown parameter: '{name(str(key)[:80])}'.",
                param=name(str(key)[:80]),
                code="unknown_parameter",
            )
    for key in _KEYS:
        if key not in value:
            raise InvalidRequest(
                f"Missing required parameter: '{name(key)}'.",
                param=name(key),
                code="missing_required_parameter",
            )
    anchor = value["anchor"]
    if anchor != ANCHOR:
        raise InvalidRequest(
            f"Invalid value for '{name('anchor')}': {str(anchor)[:80]!r}; the only supported"
            f" anchor is {ANCHOR!r}.",
            param=name("anchor"),
        )
    seconds = value["seconds"]
    if not isinstance(seconds, int) or isinstance(seconds, bool):
        raise InvalidRequest(
            f"Invalid value for '{name('seconds')}': {str(seconds)[:80]!r}; expected an integer.",
            param=name("seconds"),
        )
    if not min_seconds <= seconds <= MAX_SECONDS:
        raise InvalidRequest(
            f"Invalid value for '{name('seconds')}': {seconds}; expected between"
            f" {min_seconds} and {MAX_SECONDS} seconds.",
            param=name("seconds"),
        )
    return seconds
