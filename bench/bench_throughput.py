"""batchd throughput benchmarks on the bundled model, each measured side by side in one run.

  1. batch vs sequential   the same chat requests one at a time through the realtime endpoint
                           vs as one batch (target >= 3x), beside llama.cpp's C++ ceiling of
                           that ratio on the same tokens; in --rounds rounds, judged on the
                           medians
  2. service vs raw engine the same requests through the whole service (upload -> results) vs
                           the engine loop alone in this process (target >= 0.9)
  3. shared prefix         requests sharing a ~500-token system prompt: batch with sharing on,
                           with sharing off, and sequential realtime (target >= 6x sequential)
  4. realtime latency      realtime requests on an idle server vs while a large batch runs
                           (target p95 <= 1.5x idle)
  5. peer                 the same requests against llama.cpp's own C++ server (llama-server,
                           built from the vendored llama.cpp, -np slots, as many concurrent
                           clients), same model file, same machine: batchd batch / peer
  6. ingest interference   a batch's tok/s alone, and while a 50,000-line file is uploaded
                           and validated beside it, with the bulk threads niced and not
  7. prefix cache          with the cache on and off: a realtime request's time to first
                           token after another with the same ~500-token system prompt
                           finished (target second/first <= 0.3), and a batch submitted
                           after another with the same system prompt (target >= 2x)
  8. memory                the server's resident memory at idle and its peak over a
                           64-request batch, with an f16 and a q8_0 KV cache, their tok/s,
                           and how many greedy answers are the same with both (target
                           peak <= 1 GB with no throughput lost)

Run: .venv/bin/python bench/bench_throughput.py [--parts 1,2,3,4,5,6,7,8] [--n 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _harness import (
    append_record,
    chat_body,
    machine,
    percentile,
    run_batch,
    run_sequential,
    server,
    small_chat_workload,
)

SYSTEM_PROMPT = (
    "You are a meticulous support assistant for a company that sells hiking equipment. "
    "Follow these policies. Returns are accepted within 60 days with a receipt; items must be "
    "unused unless defective. Defective items are replaced free of charge within two years. "
    "Shipping is free for orders above 75 dollars; otherwise a flat 7 dollar fee applies. "
    "Express shipping costs 15 dollars and arrives in two business days. We ship to the "
    "United States, Canada and most of Europe, but not to Russia or Belarus. Gift cards never "
    "expire and cannot be exchanged for cash. Price matching is offered against authorized "
    "retailers for identical items in stock. Loyalty members earn one point per dollar and "
    "redeem 100 points for a 5 dollar voucher. Tents carry a lifetime warranty against seam "
    "failure; sleeping bags are warranted for five years; boots for one year against sole "
    "separation. Repairs are done at our workshop in Denver and take about three weeks. "
    "Always answer politely, in at most three sentences, cite the policy you rely on, never "
    "invent policies, and escalate to a human agent when the customer is angry, mentions a "
    "safety problem, or asks for a refund above 500 dollars. When unsure, say so and offer to "
    "connect the customer to a specialist. Shipping policy details: orders placed before noon "
    "ship the same day from our warehouse in Salt Lake City; orders placed after noon ship the "
    "next business day. Tracking numbers are emailed within two hours of shipping. Lost "
    "packages are investigated with the carrier for five business days before a replacement is "
    "sent. Damaged packages must be photographed and reported within 48 hours. International "
    "orders may incur customs duties, which are the customer's responsibility; we cannot "
    "estimate them in advance. Product care: tents should be dried before storage, stoves "
    "cleaned after every trip, and water filters back-flushed monthly. Rental program: tents, "
    "stoves and backpacks can be rented for a week at 15 percent of the retail price, with a "
    "refundable deposit equal to half the price. Do not discuss competitors. Do not give medical, "
    "legal or financial advice. Recommend products only from our own catalogue, which "
    "includes tents, backpacks, sleeping bags, stoves, water filters, trekking poles, boots, "
    "jackets, base layers, headlamps and navigation devices. Our stores open from 9 to 7 on "
    "weekdays and from 10 to 5 on weekends; the Denver flagship store also opens on Sundays."
)
QUESTIONS = [
    "Can I return boots I wore once?", "Do you ship to Canada?", "How long do tent repairs take?",
    "Is shipping free for a 50 dollar order?", "Do gift cards expire?", "Can I get cash for a gift card?",
    "What is the warranty on sleeping bags?", "Do you price match?", "When is the store open on Sunday?",
    "How do loyalty points work?", "My stove leaked gas, what do I do?", "Do you sell kayaks?",
    "How fast is express shipping?", "Can I return a defective headlamp after a year?",
    "Do you ship to Belarus?", "Which backpack do you recommend?",
]  # fmt: skip


def tok_per_s(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("nan")


# ----------------------------------------------------------------------------------- parts


def part_batch_vs_sequential(n: int, max_tokens: int, rounds: int, report: list[str]) -> None:
    """Batch against sequential, and llama.cpp's C++ ceiling of that ratio, ``rounds`` times
    in turn: on this shared 2-core machine one pair of runs can be 10% off either way, so the
    verdict is on the medians."""
    bodies = small_chat_workload(n, max_tokens)
    lines = [f"1. batch vs sequential ({n} chat requests, max_tokens {max_tokens}, greedy)"]
    print(lines[0], flush=True)
    ratios: list[float] = []
    ceilings: list[float] = []
    for round_no in range(1, rounds + 1):
        seq_s, seq_tokens, seq_usage = _sequential_arm(bodies)
        batch = _batch_arm(bodies, n)
        seq_rate = tok_per_s(seq_tokens, seq_s)
        batch_rate = tok_per_s(batch["completion_tokens"], batch["seconds"])
        ratios.append(batch_rate / seq_rate)
        # Each sequential request computes only the prompt tokens the prefix cache did not
        # hold (the chat template's shared opening is cached), and the batch shares that
        # opening too, so both arms compute about these tokens.
        uncached = seq_usage.get("prompt_tokens", 0) - seq_usage.get("cached_tokens", 0)
        ceiling = _cpp_batch_ceiling(
            n, prompt=max(1, round(uncached / n)), generated=max(1, round(seq_tokens / n))
        )
        round_lines = [
            f"   round {round_no}: sequential realtime {seq_tokens} tokens in {seq_s:.1f} s ="
            f" {seq_rate:.0f} tok/s; one batch {batch['completion_tokens']} tokens in"
            f" {batch['seconds']:.2f} s = {batch_rate:.0f} tok/s (upload to downloaded"
            f" results); ratio {ratios[-1]:.2f}x",
        ]
        if ceiling is None:
            round_lines.append("   C++ ceiling: SKIPPED (llama-batched-bench unavailable here)")
        else:
            ceilings.append(ceiling["ratio"])
            round_lines.append(
                f"            llama-batched-bench, {ceiling['prompt']} uncached prompt +"
                f" {ceiling['generated']} generated tokens a sequence: 1 at a time"
                f" {ceiling['one'] * n:.1f} s for {n} (median of {ceiling['ones']}), {n} at once"
                f" {ceiling['many']:.2f} s; the C++ ceiling {ceiling['ratio']:.2f}x;"
                f" batchd at {ratios[-1] / ceiling['ratio']:.2f} of it"
            )
            pp_gain = ceiling["pp_many"] / ceiling["pp_one"]
            tg_gain = ceiling["tg_many"] / ceiling["tg_one"]
            round_lines.append(
                f"            where batching gains, in C++: prefill {ceiling['pp_one']:.0f} tok/s"
                f" for 1 sequence, {ceiling['pp_many']:.0f} for {n} ({pp_gain:.2f}x); decode"
                f" {ceiling['tg_one']:.0f} tok/s for 1, {ceiling['tg_many']:.0f} for {n}"
                f" ({tg_gain:.2f}x)"
            )
        print("\n".join(round_lines), flush=True)
        lines += round_lines
    summary = [
        f"   median over {rounds} rounds: ratio batch/sequential {statistics.median(ratios):.2f}x"
        f" (target >= 3x; rounds {', '.join(f'{r:.2f}' for r in ratios)})"
    ]
    if ceilings:
        summary.append(
            f"   median C++ ceiling of that ratio on this shape: {statistics.median(ceilings):.2f}x"
            f" (rounds {', '.join(f'{c:.2f}' for c in ceilings)}); batchd at"
            f" {statistics.median(r / c for r, c in zip(ratios, ceilings, strict=False)):.2f}"
            " of the ceiling (median of the rounds)"
        )
    print("\n".join(summary), flush=True)
    report.extend(lines + summary)


def _sequential_arm(bodies: list[dict[str, Any]]) -> tuple[float, int, dict[str, int]]:
    usage: dict[str, int] = {}
    with server() as srv:
        client = srv.client()
        run_sequential(client, [chat_body("Warm up.", 2)])
        seconds, tokens = run_sequential(client, bodies, usage)
    return seconds, tokens, usage


def _batch_arm(bodies: list[dict[str, Any]], n: int) -> dict[str, Any]:
    # A server of its own: after the sequential arm the batch would find every one of its
    # prompts in the prefix cache. Warmed up by a batch as wide as the measured one, as the
    # sequential server is by one request: each arm then runs in its steady state, the KV
    # pages of its sequences resident (a fresh server faults them in on first use). A
    # realtime warm-up would hold batch prefill to small steps for the 2 s after it
    # (REALTIME_GRACE_SECONDS in model_runner.py).
    with server() as srv:
        client = srv.client()
        run_batch(client, [chat_body(f"Warm up {i}.", 4) for i in range(n)])
        return run_batch(client, bodies)


def _cpp_batch_ceiling(n: int, prompt: int, generated: int) -> dict[str, Any] | None:
    """llama-batched-bench with 1 and with n sequences of ``prompt`` + ``generated`` tokens:
    how much faster n at once is than n one after another, in llama.cpp's own C++. The one
    sequence is timed 5 times and the median taken, since it is multiplied by n."""
    from batchd.config import Settings
    from batchd.engines.llamacpp.model_files import bundled_gguf, requantized_q8_0
    from peer_llama_server import CACHE, batched_bench_rows, find_or_build

    binary = find_or_build("llama-batched-bench")
    if binary is None:
        return None
    threads = Settings().n_threads
    model = requantized_q8_0(bundled_gguf(), CACHE / "models", threads)
    ones = 5
    rows = batched_bench_rows(
        binary, model, threads=threads, prompt=prompt, generated=generated,
        sequences=[1] * ones + [n],
    )  # fmt: skip
    if len(rows) != ones + 1:
        return None
    one = statistics.median(row["t"] for row in rows[:ones])
    many = rows[-1]["t"]
    return {
        "prompt": prompt, "generated": generated, "one": one, "ones": ones, "many": many,
        "ratio": one * n / many,
        "pp_one": statistics.median(row["s_pp"] for row in rows[:ones]),
        "pp_many": rows[-1]["s_pp"],
        "tg_one": statistics.median(row["s_tg"] for row in rows[:ones]),
        "tg_many": rows[-1]["s_tg"],
    }  # fmt: skip


def _cpp_cache_ceiling(n: int, prefix: int, suffix: int) -> list[str]:
    """What the cache can save on part 7's second batch, at llama.cpp's own C++ speed.

    With the cache off, sharing within the batch still computes the system prompt once, so
    the cache saves exactly that one prefill. llama-batched-bench ``-pps`` gives its time (the
    shared prompt computed once) and the rest (n sequences decoding 8 tokens over it); each
    sequence's own suffix is charged at the prefill rate of the prompt, which is optimistic
    (its attention spans the whole prefix too). So (prefix + rest) / rest is an upper bound
    on the off/on ratio for this shape."""
    from batchd.config import Settings
    from batchd.engines.llamacpp.model_files import bundled_gguf, requantized_q8_0
    from peer_llama_server import CACHE, batched_bench, find_or_build

    binary = find_or_build("llama-batched-bench")
    if binary is None:
        return ["   C++ ceiling: SKIPPED (llama-batched-bench could not be built here)"]
    threads = Settings().n_threads
    model = requantized_q8_0(bundled_gguf(), CACHE / "models", threads)
    row = batched_bench(
        binary, model, threads=threads, prompt=prefix, generated=8, sequences=n,
        shared_prompt=True,
    )  # fmt: skip
    if row is None:
        return ["   C++ ceiling: SKIPPED (llama-batched-bench printed no result)"]
    rest = row["t_tg"] + n * suffix / row["s_pp"]
    return [
        f"   llama-batched-bench -pps, {prefix}-token shared prompt, {n} x ({suffix} own + 8"
        f" generated): prompt {row['t_pp']:.2f} s, the rest at least {rest:.2f} s",
        f"   the C++ ceiling of off/on on this shape: at most {(row['t_pp'] + rest) / rest:.2f}x",
    ]


def part_service_vs_raw(n: int, max_tokens: int, report: list[str]) -> None:
    from batchd.config import Settings
    from batchd.engines.llamacpp.model_files import bundled_gguf, requantized_q8_0
    from bench_engine_raw import run_raw, run_raw_detailed
    from peer_llama_server import CACHE, batched_bench, find_or_build

    bodies = small_chat_workload(n, max_tokens)
    with server() as srv:
        run_batch(srv.client(), [chat_body("Warm up.", 2)])  # as the raw loop warms up
        batch = run_batch(srv.client(), bodies)
    service_rate = tok_per_s(batch["completion_tokens"], batch["seconds"])
    raw_seconds, raw_tokens = run_raw(bodies)
    raw_rate = tok_per_s(raw_tokens, raw_seconds)
    lines = [
        f"2. service vs raw engine vs llama.cpp's C++ ({n} chat requests, max_tokens {max_tokens})",
        f"   raw engine loop: {raw_tokens} tokens in {raw_seconds:.1f} s = {raw_rate:.0f} tok/s",
        f"   whole service:   {batch['completion_tokens']} tokens in {batch['seconds']:.1f} s"
        f" = {service_rate:.0f} tok/s",
        f"   ratio service/raw: {service_rate / raw_rate:.2f} (target >= 0.9)",
    ]
    # The C++ ceiling: llama-batched-bench on the same Q8_0 file and threads, all n sequences
    # at once (one KV stream each), of the workload's mean prompt length, each generating
    # max_tokens; the raw engine with prefix sharing (and so the cache) off and room for all
    # n at once too, so both compute the same tokens in the same shape. Greedy answers may
    # stop before max_tokens, so the two are compared on all tokens (prompt + generated)/s.
    settings = Settings()
    off_seconds, off_tokens, off_prompt = run_raw_detailed(
        bodies,
        prefix_sharing=False,
        prefix_cache=False,
        max_seqs=n + 2,  # two slots stay free for realtime work
        ctx_size=(n + 2) * 1024,
    )
    off_rate = tok_per_s(off_tokens, off_seconds)
    off_all = tok_per_s(off_tokens + off_prompt, off_seconds)
    prompt = round(off_prompt / n)
    binary = find_or_build("llama-batched-bench")
    model = requantized_q8_0(bundled_gguf(), CACHE / "models", settings.n_threads)
    row = None
    if binary is not None:
        row = batched_bench(
            binary,
            model,
            threads=settings.n_threads,
            prompt=prompt,
            generated=max_tokens,
            sequences=n,
        )
    lines.append(
        f"   raw engine, sharing off, {n} at once: {off_tokens} tokens in {off_seconds:.1f} s ="
        f" {off_rate:.0f} generated tok/s, {off_all:.0f} tok/s in all ({off_tokens / n:.1f}"
        " generated a request)"
    )
    if row is None:
        lines.append("   llama-batched-bench: SKIPPED (it could not be built or run here)")
    else:
        cpp_rate = n * max_tokens / row["t"]
        lines += [
            f"   llama-batched-bench -npl {n} -npp {prompt} -ntg {max_tokens}: {row['t']:.1f} s"
            f" = {cpp_rate:.0f} generated tok/s, {row['s']:.0f} tok/s in all (prefill"
            f" {row['s_pp']:.0f} tok/s, decode {row['s_tg']:.0f} tok/s)",
            f"   ratio raw engine (sharing off)/C++, all tokens/s: {off_all / row['s']:.2f}"
            " (target >= 0.95)",
        ]
    report.extend(lines)
    print("\n".join(lines), flush=True)


def part_shared_prefix(n: int, max_tokens: int, report: list[str]) -> None:
    bodies = [
        chat_body(QUESTIONS[i % len(QUESTIONS)] + f" (ticket {i})", max_tokens, SYSTEM_PROMPT)
        for i in range(n)
    ]
    # The sequential arm's own tickets: the same system prompt, but not prompts the batch
    # left whole in the prefix cache.
    one_by_one = [
        chat_body(QUESTIONS[i % len(QUESTIONS)] + f" (ticket {n + i})", max_tokens, SYSTEM_PROMPT)
        for i in range(max(4, n // 4))
    ]
    with server(BATCHD_PREFIX_SHARING="true") as srv:
        client = srv.client()
        shared = run_batch(client, bodies)
        seq_s, seq_tokens = run_sequential(client, one_by_one)
    with server(BATCHD_PREFIX_SHARING="false") as srv:
        client = srv.client()
        unshared = run_batch(client, bodies)
        # Without sharing there is no prefix cache either: each request computes it all.
        cold_s, cold_tokens = run_sequential(client, one_by_one)
    seq_rate = tok_per_s(seq_tokens, seq_s)
    cold_rate = tok_per_s(cold_tokens, cold_s)
    on_rate = tok_per_s(shared["completion_tokens"], shared["seconds"])
    off_rate = tok_per_s(unshared["completion_tokens"], unshared["seconds"])
    lines = [
        f"3. shared prefix ({n} requests, ~{shared['prompt_tokens'] // n} prompt tokens each,"
        f" max_tokens {max_tokens})",
        f"   sequential realtime ({max(4, n // 4)} requests): {seq_rate:.0f} tok/s (each after"
        f" the last: the prefix cache serves the system prompt), {cold_rate:.0f} tok/s with"
        " sharing and the cache off",
        f"   batch, sharing off: {unshared['seconds']:.1f} s = {off_rate:.0f} tok/s,"
        f" cached_tokens {unshared['cached_tokens']}",
        f"   batch, sharing on:  {shared['seconds']:.1f} s = {on_rate:.0f} tok/s,"
        f" cached_tokens {shared['cached_tokens']} of {shared['prompt_tokens']} prompt tokens",
        f"   ratio sharing on/off: {on_rate / off_rate:.2f}x; on/sequential:"
        f" {on_rate / seq_rate:.2f}x, on/sequential without the cache:"
        f" {on_rate / cold_rate:.2f}x (target >= 6x)",
    ]
    report.extend(lines)
    print("\n".join(lines), flush=True)


def _realtime_latencies(
    client: Any, count: int, max_tokens: int
) -> tuple[list[float], list[float]]:
    ttft, total = [], []
    for i in range(count):
        body = chat_body(f"Quick question {i}: name a color of the sky.", max_tokens)
        start = time.perf_counter()
        first = None
        stream = client.chat.completions.create(**body, stream=True)
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
        total.append(time.perf_counter() - start)
        ttft.append(first if first is not None else total[-1])
        time.sleep(0.2)
    return ttft, total


def part_realtime_latency(count: int, max_tokens: int, report: list[str]) -> None:
    background = small_chat_workload(256, 64)
    with server() as srv:
        client = srv.client()
        _realtime_latencies(client, 2, max_tokens)  # warm-up
        idle_ttft, idle_total = _realtime_latencies(client, count, max_tokens)
        result: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: result.update(run_batch(srv.client(), background)))
        worker.start()
        time.sleep(3)  # let the batch fill the engine
        busy_ttft, busy_total = _realtime_latencies(client, count, max_tokens)
        batch_running = worker.is_alive()
        worker.join()
    ratio = percentile(busy_total, 95) / percentile(idle_total, 95)
    lines = [
        f"4. realtime latency under batch load ({count} streamed requests, max_tokens {max_tokens};"
        f" background batch of 256 x 64 tokens{'' if batch_running else ' (ended early!)'})",
        f"   idle:   TTFT p50 {percentile(idle_ttft, 50) * 1000:.0f} ms p95 "
        f"{percentile(idle_ttft, 95) * 1000:.0f} ms; total p50 {percentile(idle_total, 50) * 1000:.0f}"
        f" ms p95 {percentile(idle_total, 95) * 1000:.0f} ms",
        f"   loaded: TTFT p50 {percentile(busy_ttft, 50) * 1000:.0f} ms p95 "
        f"{percentile(busy_ttft, 95) * 1000:.0f} ms; total p50 {percentile(busy_total, 50) * 1000:.0f}"
        f" ms p95 {percentile(busy_total, 95) * 1000:.0f} ms",
        f"   ratio p95 total loaded/idle: {ratio:.2f}x (target <= 1.5x)",
    ]
    report.extend(lines)
    print("\n".join(lines), flush=True)


def part_peer(n: int, max_tokens: int, report: list[str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from batchd.config import Settings
    from peer_llama_server import find_or_build, llama_server

    binary = find_or_build()
    if binary is None:
        lines = ["5. peer llama-server: SKIPPED (it could not be built or found here; see above)"]
        report.extend(lines)
        print("\n".join(lines), flush=True)
        return
    bodies = small_chat_workload(n, max_tokens)
    settings = Settings()
    with server() as srv:
        batch = run_batch(srv.client(), bodies)
        model = next((srv.data_dir / "models").glob("*.gguf"))  # the same Q8_0 file batchd runs
        peer_model = Path(tempfile.mkdtemp()) / model.name
        shutil.copy2(model, peer_model)
    ours = tok_per_s(batch["completion_tokens"], batch["seconds"])
    slots = settings.max_seqs
    from _harness import free_port

    try:
        with llama_server(binary, peer_model, free_port(), slots, settings.ctx_size) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
            client.chat.completions.create(**bodies[0])  # warm-up

            def one(body: dict[str, Any]) -> int:
                response = client.chat.completions.create(**body)
                return response.usage.completion_tokens if response.usage else 0

            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=slots) as pool:
                tokens = sum(pool.map(one, bodies))
            seconds = time.perf_counter() - start
    except RuntimeError as exc:
        lines = [f"5. peer llama-server: SKIPPED (it did not start: {str(exc)[-300:]})"]
        report.extend(lines)
        print("\n".join(lines), flush=True)
        return
    peer = tok_per_s(tokens, seconds)
    lines = [
        f"5. peer: llama-server -np {slots} with {slots} concurrent clients, same Q8_0 file",
        f"   llama-server: {tokens} tokens in {seconds:.1f} s = {peer:.0f} tok/s",
        f"   batchd batch: {batch['completion_tokens']} tokens in {batch['seconds']:.1f} s = {ours:.0f} tok/s",
        f"   ratio batchd/llama-server: {ours / peer:.2f}",
    ]
    report.extend(lines)
    print("\n".join(lines), flush=True)


def _ingest_file(lines: int) -> bytes:
    rows = []
    for i in range(lines):
        body = chat_body(f"Bulk question {i} about {i % 97} things.", 16)
        rows.append(
            json.dumps(
                {
                    "custom_id": f"bulk-{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": body,
                }
            )
        )
    return "\n".join(rows).encode()


def part_interference(report: list[str]) -> None:
    bodies = small_chat_workload(64, 48)
    bulk = _ingest_file(50_000)
    rates: dict[str, float] = {}
    for label, env in (
        ("batch alone", {}),
        ("with ingest, bulk threads niced", {"BATCHD_BACKGROUND_NICE": "19"}),
        ("with ingest, not niced", {"BATCHD_BACKGROUND_NICE": "0"}),
    ):
        with server(**env) as srv:
            client = srv.client()
            stop = threading.Event()
            ingested: list[float] = []

            def ingest(
                client: Any = client,
                stop: threading.Event = stop,
                ingested: list[float] = ingested,
            ) -> None:
                # Upload and validate the big file again and again while the batch runs.
                while not stop.is_set():
                    start = time.perf_counter()
                    file = client.files.create(file=("bulk.jsonl", bulk), purpose="batch")
                    batch = client.batches.create(
                        input_file_id=file.id,
                        endpoint="/v1/chat/completions",
                        completion_window="24h",
                    )
                    while client.batches.retrieve(batch.id).status == "validating":
                        time.sleep(0.05)
                    client.batches.cancel(batch.id)
                    ingested.append(time.perf_counter() - start)

            worker = threading.Thread(target=ingest) if env else None
            if worker:
                worker.start()
            result = run_batch(client, bodies)
            stop.set()
            if worker:
                worker.join()
        rates[label] = tok_per_s(result["completion_tokens"], result["seconds"])
        extra = f", {len(ingested)} uploads of 50,000 lines validated" if env else ""
        report.append(f"   {label}: {rates[label]:.0f} tok/s{extra}")
    base = rates["batch alone"]
    lines = [
        "6. ingest interference (64 chat requests x 48 tokens; 50,000-line uploads beside them)",
        *report[-3:],
        f"   retained: niced {rates['with ingest, bulk threads niced'] / base:.2f},"
        f" not niced {rates['with ingest, not niced'] / base:.2f} of the batch-alone rate",
    ]
    del report[-3:]
    report.extend(lines)
    print("\n".join(lines), flush=True)


def _first_token_seconds(client: Any, body: dict[str, Any]) -> float:
    start = time.perf_counter()
    first = None
    for chunk in client.chat.completions.create(**body, stream=True):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
    return first if first is not None else time.perf_counter() - start


def part_prefix_cache(n: int, report: list[str]) -> None:
    """Requests that arrive after others with the same system prompt have finished: nothing
    runs beside them to share with, so only a cache that outlives requests helps."""
    realtime = [chat_body(q, 8, SYSTEM_PROMPT) for q in QUESTIONS[:4]]
    first_batch = [chat_body(f"{QUESTIONS[i % 16]} (A{i})", 8, SYSTEM_PROMPT) for i in range(n)]
    second_batch = [chat_body(f"{QUESTIONS[i % 16]} (B{i})", 8, SYSTEM_PROMPT) for i in range(n)]
    rows: dict[str, dict[str, float]] = {}
    for label, flag in (("on", "true"), ("off", "false")):
        with server(BATCHD_PREFIX_CACHE=flag) as srv:
            client = srv.client()
            run_sequential(client, [chat_body("Warm up.", 2)])
            first = _first_token_seconds(client, realtime[0])
            later = [_first_token_seconds(client, body) for body in realtime[1:]]
            run_batch(client, first_batch)
            second = run_batch(client, second_batch)
        rows[label] = {
            "first": first,
            "later": sorted(later)[len(later) // 2],
            "batch": second["seconds"],
            "cached": second["cached_tokens"],
            "prompt": second["prompt_tokens"],
        }
    on, off = rows["on"], rows["off"]
    lines = [
        f"7. prefix cache (system prompt ~{on['prompt'] // n} tokens of each prompt)",
        f"   realtime TTFT, cache on:  first {on['first'] * 1000:.0f} ms, later ones (median)"
        f" {on['later'] * 1000:.0f} ms = {on['later'] / on['first']:.2f}x (target <= 0.3)",
        f"   realtime TTFT, cache off: first {off['first'] * 1000:.0f} ms, later ones (median)"
        f" {off['later'] * 1000:.0f} ms = {off['later'] / off['first']:.2f}x",
        f"   a second batch of {n} (max_tokens 8) after a first: cache on {on['batch']:.2f} s"
        f" (cached_tokens {on['cached']:.0f} of {on['prompt']:.0f}), cache off"
        f" {off['batch']:.2f} s (cached_tokens {off['cached']:.0f})",
        f"   ratio off/on: {off['batch'] / on['batch']:.2f}x (target >= 2x)",
    ]
    lines += _cpp_cache_ceiling(
        n, round(on["cached"] / n), round((on["prompt"] - on["cached"]) / n)
    )
    report.extend(lines)
    print("\n".join(lines), flush=True)


def _rss_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak) of ``pid``, in KiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def _sample_rss(pid: int, done: threading.Event, into: list[int]) -> None:
    while not done.wait(0.05):
        into.append(_rss_kib(pid)["VmRSS"])


def part_memory(n: int, max_tokens: int, report: list[str]) -> None:
    bodies = small_chat_workload(n, max_tokens)
    rows: dict[str, dict[str, Any]] = {}
    for kv_type in ("f16", "q8_0"):
        with server(BATCHD_KV_TYPE=kv_type) as srv:
            time.sleep(1)
            idle = _rss_kib(srv.proc.pid)["VmRSS"]
            serving = [idle]
            done = threading.Event()

            sampler = threading.Thread(
                target=_sample_rss, args=(srv.proc.pid, done, serving), daemon=True
            )
            sampler.start()
            batch = run_batch(srv.client(), bodies)
            done.set()
            sampler.join()
            # VmHWM includes start-up, when llama.cpp clears the whole KV cache for a moment.
            peak = _rss_kib(srv.proc.pid)["VmHWM"]
        texts = {
            row["custom_id"]: row["response"]["body"]["choices"][0]["message"]["content"]
            for row in batch["rows"]
        }
        rate = tok_per_s(batch["completion_tokens"], batch["seconds"])
        rows[kv_type] = {
            "idle": idle,
            "serving": max(serving),
            "peak": peak,
            "rate": rate,
            "texts": texts,
        }
    same = sum(rows["f16"]["texts"][k] == v for k, v in rows["q8_0"]["texts"].items())
    lines = [f"8. memory ({n} chat requests, max_tokens {max_tokens}, greedy, default settings)"]
    for kv_type, row in rows.items():
        lines.append(
            f"   KV {kv_type:5}: idle {row['idle'] / 1024:.0f} MiB, peak while serving the batch"
            f" {row['serving'] / 1024:.0f} MiB, process peak {row['peak'] / 1024:.0f} MiB"
            f" (start-up), {row['rate']:.0f} tok/s"
        )
    lines.append(
        f"   q8_0 vs f16: {same} of {n} greedy answers identical; throughput"
        f" {rows['q8_0']['rate'] / rows['f16']['rate']:.2f}x (target peak <= 1024 MiB)"
    )
    report.extend(lines)
    print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--parts", default="1,2,3,4,5,6,7,8")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, default=3, help="part 1's rounds; its verdict is on their medians"
    )
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    report: list[str] = []
    print(f"machine: {machine()}", flush=True)
    if 1 in parts:
        part_batch_vs_sequential(args.n, 48, args.rounds, report)
    if 2 in parts:
        part_service_vs_raw(args.n, 48, report)
    if 3 in parts:
        part_shared_prefix(32, 32, report)
    if 4 in parts:
        part_realtime_latency(20, 32, report)
    if 5 in parts:
        part_peer(args.n, 48, report)
    if 6 in parts:
        part_interference(report)
    if 7 in parts:
        part_prefix_cache(16, report)
    if 8 in parts:
        part_memory(args.n, 48, report)
    if not args.no_record:
        append_record(
            f"python bench/bench_throughput.py --parts {args.parts} --n {args.n}"
            f" --rounds {args.rounds}",
            report,
        )


if __name__ == "__main__":
    main()
