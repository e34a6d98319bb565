"""Serving GGUF files by path (`--model NAME=PATH`, BATCHD_MODELS) beside each other."""

from __future__ import annotations

from pathlib import Path

import openai

from batchd.engines.llamacpp.model_files import bundled_gguf
from tests.support.helpers import chat_line, read_jsonl, upload, wait_for
from tests.support.serverproc import running_server


def test_models_by_path_with_as_is_weights(data_dir: Path) -> None:
    path = bundled_gguf()
    with running_server(
        data_dir, BATCHD_MODELS=f"alpha={path},beta={path}", BATCHD_QUANT="as-is"
    ) as server:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0)
        assert {m.id for m in client.models.list()} == {"alpha", "beta", "default"}
        for model in ("alpha", "beta", "default"):
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
            )
            # The served model's id: "default" is an alias of alpha.
            served = "alpha" if model == "default" else model
            assert reply.model == served and reply.choices[0].message.content
        lines = [chat_line("a", "One?", model="alpha"), chat_line("b", "Two?", model="beta")]
        batch = client.batches.create(
            input_file_id=upload(client, lines),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        batch = wait_for(client, batch.id)
        assert batch.status == "completed" and batch.model == "alpha,beta"
        assert {row["custom_id"] for row in read_jsonl(client, batch.output_file_id)} == {"a", "b"}
    assert not (data_dir / "models").exists(), "as-is must not convert anything"
