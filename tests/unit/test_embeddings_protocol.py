"""OpenAI embeddings bodies: what becomes an ``EmbedRequest``, and the answer's wire shape."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from batchd.engines.base import EmbedResult, Priority
from batchd.errors import InvalidRequest
from batchd.protocol.openai import bodies as oa_bodies
from batchd.protocol.openai.embeddings import embeddings_body


def parse(body: dict[str, object]) -> oa_bodies.EmbeddingRequest:
    parsed = oa_bodies.check_body(oa_bodies.EMBEDDINGS_ENDPOINT, body)
    assert isinstance(parsed, oa_bodies.EmbeddingRequest)
    return parsed


def test_a_string_or_a_list_of_strings_becomes_the_inputs() -> None:
    one = parse({"model": "m", "input": "hello"}).to_embedding(Priority.REALTIME)
    assert (one.model, one.inputs, one.priority) == ("m", ("hello",), Priority.REALTIME)
    many = parse({"model": "m", "input": ["a", "b"], "dimensions": 384}).to_embedding()
    assert (many.inputs, many.dimensions) == (("a", "b"), 384)


@pytest.mark.parametrize("tokens", [[1, 2, 3], [[1, 2], [3]]])
def test_token_arrays_are_refused_naming_input(tokens: object) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        parse({"model": "m", "input": tokens}).to_embedding()
    assert excinfo.value.param == "input"


def test_more_inputs_than_openai_allows_are_refused() -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        parse({"model": "m", "input": ["x"] * 2049}).to_embedding()
    assert excinfo.value.param == "input"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "m", "input": "x", "dimensions": 0}, "dimensions"),
    ],
)
def test_bad_fields_are_named(body: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        parse(body)
    assert excinfo.value.param == param


def test_the_answer_in_floats_and_in_base64() -> None:
    result = EmbedResult([[0.5, -0.25], [1.0, 0.0]], prompt_tokens=7)
    floats = embeddings_body("m", result)
    assert floats["object"] == "list" and floats["model"] == "m"
    assert floats["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert [d["index"] for d in floats["data"]] == [0, 1]
    assert floats["data"][0] == {"object": "embedding", "index": 0, "embedding": [0.5, -0.25]}
    encoded = embeddings_body("m", result, "base64")["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert decoded.tolist() == [0.5, -0.25]
