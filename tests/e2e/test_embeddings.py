"""/v1/embeddings on the embedded default (the bundled all-MiniLM-L6-v2, no configuration),
realtime and in batches, through the official SDK against a real server."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import openai
import pytest

from tests.support.helpers import read_jsonl, upload, wait_for

MODEL = "all-minilm-l6-v2"


def cosine(a: list[float], b: list[float]) -> float:
    va, vb = np.array(a), np.array(b)
    return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))


def embedding_line(custom_id: str, text: str | list[str], **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": MODEL, "input": text, **body},
    }


def test_the_embedding_model_is_listed(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert MODEL in models and "default" in models
    assert models[MODEL].model_extra["context_length"] == 512


def test_embeddings_of_a_list_in_the_sdks_default_base64(client: openai.OpenAI) -> None:
    # The SDK asks for base64 unless told otherwise, and decodes it.
    response = client.embeddings.create(
        model=MODEL,
        input=[
            "A man is playing a guitar.",
            "Someone plays the guitar.",
            "The stock market fell sharply today.",
        ],
    )
    assert response.object == "list" and response.model == MODEL
    assert [d.index for d in response.data] == [0, 1, 2]
    guitar, plays, market = (d.embedding for d in response.data)
    assert len(guitar) == 384
    assert abs(float(np.linalg.norm(guitar)) - 1) < 1e-4
    # Paraphrases score a higher cosine than unrelated sentences.
    assert cosine(guitar, plays) > cosine(guitar, market) + 0.4
    assert response.usage.prompt_tokens == response.usage.total_tokens > 3 * 2


def test_floats_and_base64_carry_the_same_vector(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model=MODEL, input="hello world", encoding_format="float")
    raw = client.embeddings.with_raw_response.create(
        model=MODEL, input="hello world", encoding_format="base64", dimensions=384
    ).http_response.json()
    encoded = raw["data"][0]["embedding"]
    assert isinstance(encoded, str)
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert np.allclose(decoded, floats.data[0].embedding, atol=1e-6)
    assert floats.usage.prompt_tokens == 4  # [CLS] hello world [SEP]


def test_refusals_name_their_field(client: openai.OpenAI) -> None:
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"model": MODEL, "input": "x", "dimensions": 64}, 400, "dimensions"),
        ({"model": MODEL, "input": [[1, 2, 3]]}, 400, "input"),
        ({"model": MODEL, "input": "word " * 600}, 400, "input"),
        ({"model": "default", "input": "x"}, 400, "model"),
        ({"model": "nope", "input": "x"}, 404, "model"),
    ]
    for body, status, param in cases:
        with pytest.raises(openai.APIStatusError) as excinfo:
            client.embeddings.create(**body)
        assert excinfo.value.status_code == status, body
        assert excinfo.value.body["param"] == param, body
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
    assert bad.value.body["param"] == "model"


def test_a_batch_of_embeddings(client: openai.OpenAI) -> None:
    texts = [f"A sentence about topic number {i}." for i in range(30)]
    lines = [embedding_line(f"e{i}", text, encoding_format="float") for i, text in enumerate(texts)]
    lines.append(embedding_line("pair", ["A cat sits on the mat.", "A cat is on a mat."]))
    lines.append(embedding_line("bad", "x", dimensions=8))
    batch = client.batches.create(
        input_file_id=upload(client, lines), endpoint="/v1/embeddings", completion_window="24h"
    )
    batch = wait_for(client, batch.id, timeout=120)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (31, 1)
    output = {row["custom_id"]: row for row in read_jsonl(client, batch.output_file_id)}
    errors = {row["custom_id"]: row for row in read_jsonl(client, batch.error_file_id)}
    assert errors["bad"]["response"]["body"]["error"]["param"] == "dimensions"
    realtime = client.embeddings.create(model=MODEL, input=texts[3], encoding_format="float")
    row = output["e3"]["response"]
    assert row["status_code"] == 200 and row["body"]["object"] == "list"
    assert np.allclose(row["body"]["data"][0]["embedding"], realtime.data[0].embedding, atol=2e-3)
    assert row["body"]["usage"]["prompt_tokens"] == realtime.usage.prompt_tokens
    pair = output["pair"]["response"]["body"]["data"]
    assert cosine(pair[0]["embedding"], pair[1]["embedding"]) > 0.7
