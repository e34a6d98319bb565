"""OpenAI's expiration policies, as parsed: ``expires_after`` from an upload form and
``output_expires_after`` from a batch create; each refusal names the field."""

from __future__ import annotations

import pytest

from batchd.errors import InvalidRequest
from batchd.protocol.openai import expiry


def test_a_policy_gives_its_seconds_within_openai_s_range() -> None:
    for seconds in (3600, 86_400, 2_592_000):
        policy = {"anchor": "created_at", "seconds": seconds}
        assert expiry.parse_expires_after(policy, field="output_expires_after") == seconds
    assert expiry.parse_expires_after(None, field="output_expires_after") is None
    policy = {"anchor": "created_at", "seconds": 5}
    assert expiry.parse_expires_after(policy, field="x", min_seconds=1) == 5


@pytest.mark.parametrize(
    ("value", "param", "message"),
    [
        ("1h", "output_expires_after", "output_expires_after must be an object"),
        ({"seconds": 3600}, "output_expires_after.anchor", "Missing required parameter"),
        ({"anchor": "created_at"}, "output_expires_after.seconds", "Missing required parameter"),
        (
            {"anchor": "last_active_at", "seconds": 3600},
            "output_expires_after.anchor",
            "Invalid value for 'output_expires_after.anchor'",
        ),
        (
            {"anchor": "created_at", "seconds": 3599},
            "output_expires_after.seconds",
            "Invalid value for 'output_expires_after.seconds': 3599; expected between 3600",
        ),
        (
            {"anchor": "created_at", "seconds": 2_592_001},
            "output_expires_after.seconds",
            "Invalid value for 'output_expires_after.seconds': 2592001",
        ),
        (
            {"anchor": "created_at", "seconds": "3600"},
            "output_expires_after.seconds",
            "expected an integer",
        ),
        ({"anchor": "created_at", "seconds": True}, "output_expires_after.seconds", "integer"),
        ({"anchor": "created_at", "seconds": 3600.0}, "output_expires_after.seconds", "integer"),
        (
            {"anchor": "created_at", "seconds": 3600, "days": 1},
            "output_expires_after.days",
            "Unknown parameter",
        ),
    ],
)
def test_malformed_or_out_of_range_policies_are_refused_naming_the_field(
    value: object, param: str, message: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        expiry.parse_expires_after(value, field="output_expires_after")
    assert refused.value.param == param and message in refused.value.message


def test_an_upload_form_s_policy_is_read_from_its_bracketed_fields() -> None:
    assert expiry.form_expires_after({"purpose": "batch"}) is None
    fields = {"purpose": "batch", "expires_after[anchor]": "created_at"}
    assert expiry.form_expires_after({**fields, "expires_after[seconds]": "7200"}) == {
        "anchor": "created_at",
        "seconds": 7200,
    }
    # Not a number: left as sent, for the parser to refuse naming the form field.
    policy = expiry.form_expires_after({**fields, "expires_after[seconds]": "-5"})
    with pytest.raises(InvalidRequest) as refused:
        expiry.parse_expires_after(policy, field="expires_after", form=True)
    assert refused.value.param == "expires_after[seconds]"
    assert "expires_after[seconds]" in refused.value.message
    with pytest.raises(InvalidRequest) as refused:
        expiry.parse_expires_after(
            expiry.form_expires_after(fields), field="expires_after", form=True
        )
    assert refused.value.param == "expires_after[seconds]"


@pytest.mark.parametrize("name", ["expires_after", "expires_after[days]", "expires_after.x"])
def test_an_upload_form_field_the_policy_does_not_have_is_refused(name: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        expiry.form_expires_after({name: "1"})
    assert refused.value.param == name
