"""The engine loop alone: the same chat requests straight into the embedded engine, no HTTP,
no database, no files. The reference for "service vs raw engine", and the engine's own
batch/sequential ratio.

Run: .venv/bin/python bench/bench_engine_raw.py [--n 64] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import chat_body, machine, small_chat_workload
from batchd.config import Settings
from batchd.engines.base import ChatMessage, GenerationRequest, SamplingParams
from batchd.engines.llamacpp.engine import LlamaCppEngine


def _requests(bodies: list[dict[str, Any]]) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            model=body["model"],
            params=SamplingParams(max_tokens=body["max_tokens"], temperature=body["temperature"]),
            messages=tuple(ChatMessage(m["role"], m["content"]) for m in body["messages"]),
        )
        for body in bodies
    ]


def _engine(data_dir: Path, **overrides: Any) -> LlamaCppEngine:
    settings = Settings()  # the server's defaults and BATCHD_* variables, so both arms match
    options: dict[str, Any] = {
        "quant": settings.quant,
        "n_threads": settings.n_threads,
        "ctx_size": settings.ctx_size,
        "max_seqs": settings.max_seqs,
        "prefix_sharing": settings.prefix_sharing,
        "prefix_cache": settings.prefix_cache,
        "kv_type": settings.kv_type,
    }
    return LlamaCppEngine(models=[], data_dir=data_dir, **{**options, **overrides})


async def _run(
    bodies: list[dict[str, Any]], concurrent: bool, **overrides: Any
) -> tuple[float, int, int]:
    with tempfile.TemporaryDirectory(prefix="batchd-raw-") as tmp:
        engine = _engine(Path(tmp), **overrides)
        await engine.start()
        try:
            requests = _requests(bodies)
            # Warm up on a prompt of its own: the workload's own would then sit whole in the
            # prefix cache.
            await engine.generate(_requests([chat_body("Warm up.", 2)])[0])
            start = time.perf_counter()
            if concurrent:
                results = await asyncio.gather(*(engine.generate(r) for r in requests))
            else:
                results = [await engine.generate(r) for r in requests]
            seconds = time.perf_counter() - start
        finally:
            await engine.close()
    completion = sum(r.completion_tokens for r in results)
    return seconds, completion, sum(r.prompt_tokens for r in results)


def run_raw(bodies: list[dict[str, Any]], concurrent: bool = True) -> tuple[float, int]:
    seconds, completion, _ = asyncio.run(_run(bodies, concurrent))
    return seconds, completion


def run_raw_detailed(bodies: list[dict[str, Any]], **overrides: Any) -> tuple[float, int, int]:
    """All at once, with engine options overridden (``prefix_sharing=False``...): seconds,
    completion tokens, prompt tokens."""
    return asyncio.run(_run(bodies, True, **overrides))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    bodies = small_chat_workload(args.n, args.max_tokens)
    print(f"machine: {machine()}; engine threads {os.cpu_count()}")
    seq_s, seq_tokens = run_raw(bodies, concurrent=False)
    batch_s, batch_tokens = run_raw(bodies, concurrent=True)
    seq_rate, batch_rate = seq_tokens / seq_s, batch_tokens / batch_s
    print(f"raw engine, one at a time: {seq_tokens} tokens in {seq_s:.1f} s = {seq_rate:.0f} tok/s")
    print(
        f"raw engine, all at once:   {batch_tokens} tokens in {batch_s:.1f} s = {batch_rate:.0f} tok/s"
    )
    print(f"raw engine ratio: {batch_rate / seq_rate:.2f}x")


if __name__ == "__main__":
    main()
