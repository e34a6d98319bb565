"""The OpenAI embeddings answer (``object: "list"`` of ``embedding`` objects), built from an
engine's vectors: floats as JSON numbers, or base64 of little-endian float32 as OpenAI sends."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from batchd.engines.base import EmbedResult


def encode_vector(vector: list[float], encoding_format: str | None) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


def embeddings_body(
    model: str, result: EmbedResult, encoding_format: str | None = None
) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": index,
                "embedding": encode_vector(vector, encoding_format),
            }
            for index, vector in enumerate(result.vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
