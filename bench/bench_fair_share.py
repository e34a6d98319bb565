"""Fair share across tenants on the embedded engine: each tenant's share of the tokens over time.

Tenants with unequal backlogs and weights submit batches to one server (one keys file, real
engine, bundled model); every few seconds the bench reads each batch's usage over the API and
prints, per window, the engine tokens (uncached prompt + completion) each tenant got and its
share, beside the share its weight entitles it to among the tenants with work left.

  1. two tenants, weights 1 / 2: a (600 requests) and b (150 requests, 3 s later)
  2. three tenants, weights 1 / 2 / 1: a (400), b (400), c (100, 3 s later)

Run: .venv/bin/python bench/bench_fair_share.py [--scenarios 1,2] [--window 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import openai

from _harness import append_record, machine, server, small_chat_workload

MAX_TOKENS = 16


@dataclass
class Tenant:
    name: str
    weight: float
    requests: int
    delay: float = 0.0  # seconds after the first submission
    key: str = ""
    batch_id: str = ""
    tokens: list[int] = field(default_factory=list)  # cumulative engine tokens per sample
    done_at: float | None = None


SCENARIOS = {
    1: [Tenant("a", 1, 600), Tenant("b", 2, 150, delay=3)],
    2: [Tenant("a", 1, 400), Tenant("b", 2, 400), Tenant("c", 1, 100, delay=3)],
}


def _engine_tokens(batch: object) -> int:
    usage = getattr(batch, "usage", None)
    if usage is None:
        return 0
    return usage.input_tokens - usage.input_tokens_details.cached_tokens + usage.output_tokens


def _submit(client: openai.OpenAI, tenant: Tenant) -> str:
    lines = [
        {"custom_id": f"{tenant.name}{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": body}
        for i, body in enumerate(small_chat_workload(tenant.requests, MAX_TOKENS))
    ]  # fmt: skip
    data = "\n".join(json.dumps(line) for line in lines).encode()
    file = client.files.create(file=(f"{tenant.name}.jsonl", data), purpose="batch")
    return client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id


def run_scenario(number: int, window: float, report: list[str]) -> None:
    tenants = SCENARIOS[number]
    with tempfile.TemporaryDirectory(prefix="batchd-fair-") as tmp:
        keys = Path(tmp) / "keys.txt"
        for tenant in tenants:
            tenant.key = f"bench-key-{tenant.name}-0001"
        keys.write_text("".join(f"{t.key} team-{t.name} weight={t.weight:g}\n" for t in tenants))
        with server(BATCHD_KEYS_FILE=str(keys)) as srv:
            clients = {
                t.name: openai.OpenAI(base_url=srv.url + "/v1", api_key=t.key, max_retries=0)
                for t in tenants
            }
            start = time.monotonic()
            for tenant in sorted(tenants, key=lambda t: t.delay):
                time.sleep(max(0.0, start + tenant.delay - time.monotonic()))
                tenant.batch_id = _submit(clients[tenant.name], tenant)
            samples: list[float] = []
            while any(t.done_at is None for t in tenants):
                time.sleep(max(0.0, start + window * (len(samples) + 1) - time.monotonic()))
                samples.append(time.monotonic() - start)
                for tenant in tenants:
                    batch = clients[tenant.name].batches.retrieve(tenant.batch_id)
                    tenant.tokens.append(_engine_tokens(batch))
                    ended = batch.status in ("completed", "failed", "expired", "cancelled")
                    if ended and tenant.done_at is None:
                        tenant.done_at = samples[-1]
    lines = [
        f"{number}. {len(tenants)} tenants: "
        + ", ".join(
            f"{t.name} weight {t.weight:g}, {t.requests} requests"
            + (f" ({t.delay:g} s later)" if t.delay else "")
            for t in tenants
        ),
        "   window      "
        + "".join(f"{t.name + ' tok':>10}{t.name + ' share':>9}" for t in tenants)
        + "   due (by weight, among those with work)",
    ]
    previous = {t.name: 0 for t in tenants}
    overlap = {t.name: 0 for t in tenants}
    for i, at in enumerate(samples):
        got = {t.name: t.tokens[i] - previous[t.name] for t in tenants}
        previous = {t.name: t.tokens[i] for t in tenants}
        total = sum(got.values()) or 1
        # Who had work during this window: submitted by its start, not done before it.
        begin = at - window
        busy = [
            t for t in tenants
            if t.delay <= begin and (t.done_at is None or t.done_at >= at)
        ]  # fmt: skip
        weight = sum(t.weight for t in busy) or 1
        due = " / ".join(f"{t.name} {t.weight / weight:.0%}" for t in busy)
        if len(busy) == len(tenants):
            for name, tokens in got.items():
                overlap[name] += tokens
        lines.append(
            f"   {begin:5.0f}-{at:<5.0f}"
            + "".join(f"{got[t.name]:>10}{got[t.name] / total:>9.0%}" for t in tenants)
            + f"   {due}"
        )
    together = sum(overlap.values())
    if together:
        weight = sum(t.weight for t in tenants)
        lines.append(
            "   while all had work: "
            + ", ".join(
                f"{t.name} {overlap[t.name] / together:.0%} (due {t.weight / weight:.0%})"
                for t in tenants
            )
        )
    lines.append(
        "   finished at: " + ", ".join(f"{t.name} {t.done_at:.0f} s" for t in tenants if t.done_at)
    )
    report.extend(lines)
    print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenarios", default="1,2")
    parser.add_argument("--window", type=float, default=5.0)
    args = parser.parse_args()
    report: list[str] = []
    print(f"machine: {machine()}", flush=True)
    for number in (int(s) for s in args.scenarios.split(",")):
        run_scenario(number, args.window, report)
    append_record(
        f"python bench/bench_fair_share.py --scenarios {args.scenarios} --window {args.window:g}",
        report,
        title="fair share",
    )


if __name__ == "__main__":
    main()
