"""Embeddings on the embedded default (the bundled all-MiniLM-L6-v2): the same inputs as one
/v1/embeddings batch vs one realtime request each, one after another, against one real server;
and the engine alone (no HTTP), inputs packed per llama_decode vs embedded one at a time.

Run: .venv/bin/python bench/bench_embeddings.py [--n 512]
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

from _harness import TOPICS, bench_parser, report_and_record, server
from batchd.engines.base import EmbedRequest
from batchd.engines.llamacpp.embedder import Embedder
from batchd.engines.llamacpp.embedding_files import (
    EMBEDDING_DIMENSIONS,
    EMBEDDING_MODEL_ID,
    bundled_embedding_source,
    converted_embedding_gguf,
)

MODEL = EMBEDDING_MODEL_ID


def texts(n: int, short: bool = False) -> list[str]:
    """Passages of 12 to 44 words, as a retrieval corpus's chunks might be; or (``short``)
    queries of 2 to 5 words, as a search box sends."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        if short:
            out.append(" ".join([topic, str(i)] + ["facts"] * (i % 4)))
        else:
            words = 8 + (i * 7) % 33
            out.append(" ".join([f"Notes on {topic}, part {i}:"] + [topic] * words))
    return out


def one_by_one(client: object, inputs: list[str]) -> float:
    start = time.perf_counter()
    for text in inputs:
        client.embeddings.create(model=MODEL, input=text, encoding_format="float")  # type: ignore[attr-defined]
    return time.perf_counter() - start


def as_batch(client: object, inputs: list[str]) -> float:
    lines = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": MODEL, "input": text, "encoding_format": "float"},
        }
        for i, text in enumerate(inputs)
    ]
    data = "\n".join(json.dumps(line) for line in lines).encode()
    start = time.perf_counter()
    file = client.files.create(file=("emb.jsonl", data), purpose="batch")  # type: ignore[attr-defined]
    batch = client.batches.create(  # type: ignore[attr-defined]
        input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.05)
        batch = client.batches.retrieve(batch.id)  # type: ignore[attr-defined]
    content = client.files.content(batch.output_file_id).text  # type: ignore[attr-defined]
    seconds = time.perf_counter() - start
    rows = [json.loads(x) for x in content.splitlines() if x.strip()]
    assert batch.status == "completed" and len(rows) == len(inputs), batch
    return seconds


async def raw(inputs: list[str], packed: bool) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="batchd-emb-") as tmp:
        path = converted_embedding_gguf(bundled_embedding_source(), Path(tmp))
        embedder = Embedder(MODEL, lambda: path, dimensions=EMBEDDING_DIMENSIONS, n_threads=2)
        embedder.thread.start()
        try:
            await embedder.embed(EmbedRequest(MODEL, ("warm up",)))
            before = embedder.decodes
            start = time.perf_counter()
            requests = [EmbedRequest(MODEL, (text,)) for text in inputs]
            if packed:
                await asyncio.gather(*(embedder.embed(r) for r in requests))
            else:
                for request in requests:
                    await embedder.embed(request)
            return time.perf_counter() - start, embedder.decodes - before
        finally:
            embedder.close()


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--n", type=int, default=512, help="inputs (one per request or line)")
    args = parser.parse_args()
    report = [f"model {MODEL}, {args.n} inputs per arm"]
    workloads = {"queries of 2-5 words": True, "passages of 12-44 words": False}
    with server() as srv:
        client = srv.client()
        client.embeddings.create(model=MODEL, input="warm up")  # converts and loads the model
        for name, short in workloads.items():
            inputs = texts(args.n, short)
            seq_s = one_by_one(client, inputs)
            batch_s = as_batch(client, inputs)
            report.append(f"{name}:")
            report.append(f"  server, one request each: {seq_s:7.2f} s = {args.n / seq_s:7.1f}/s")
            report.append(
                f"  server, one batch:        {batch_s:7.2f} s = {args.n / batch_s:7.1f}/s"
            )
            report.append(f"  server ratio (batch / one by one): {seq_s / batch_s:.2f}x")
    for name, short in workloads.items():
        inputs = texts(args.n, short)
        alone_s, alone_decodes = asyncio.run(raw(inputs, packed=False))
        packed_s, packed_decodes = asyncio.run(raw(inputs, packed=True))
        report.append(f"{name}, engine alone:")
        report.append(
            f"  one at a time: {alone_s:7.2f} s = {args.n / alone_s:7.1f}/s ({alone_decodes} passes)"
        )
        report.append(
            f"  packed:        {packed_s:7.2f} s = {args.n / packed_s:7.1f}/s ({packed_decodes} passes)"
        )
        report.append(f"  engine ratio (packed / one at a time): {alone_s / packed_s:.2f}x")
    report_and_record(report, args, "bench_embeddings.py", "embeddings")


if __name__ == "__main__":
    main()
