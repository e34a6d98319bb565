"""What a batch file will cost and how long it will take, before it is submitted.

Prompt tokens are counted exactly with the served model's own tokenizer and chat template
(where the model runs in-process; an upstream model's prompt is approximated at four bytes a
token, and the answer says so). Output tokens are each line's ``max_tokens`` at most, and are
expected at the recent mean per request of the same model where batches of it ran lately.
The time is the queue ahead plus this batch, in tokens, at the deployment's throughput
measured over its recently running batches. Every figure comes with the assumptions it rests
on, in the answer itself."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from batchd.costs.cost import ModelUsage, cost_of
from batchd.engines.base import Priority
from batchd.errors import BatchdError, InvalidRequest
from batchd.inference import dispatch
from batchd.protocol import batch_file
from batchd.service import files
from batchd.service.services import Services
from batchd.store.records import BatchRecord, BatchStatus

RECENT_SECONDS = 1800  # batches running or ended this recently measure the throughput
BYTES_PER_TOKEN = 4  # the approximation where no tokenizer is at hand
MAX_FAILING_LINES = 20
_RUNNING = (BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING, BatchStatus.CANCELLING)


@dataclass
class _ModelLines:
    requests: int = 0
    input_tokens: int = 0
    exact: bool = True
    max_tokens: list[int | None] = field(default_factory=list)
    prompts: list[tuple[int, ...]] = field(default_factory=list)  # tokenized prompts

    @property
    def shared_tokens(self) -> int:
        """Prompt tokens the engine computes once for several requests: with the prompts in
        order, each shares its common prefix with the one before it (the engine groups a
        batch by prefix and copies a shared prefix instead of computing it again)."""
        shared = 0
        previous: tuple[int, ...] = ()
        for prompt in sorted(self.prompts):
            common = 0
            for a, b in zip(prompt, previous, strict=False):
                if a != b:
                    break
                common += 1
            shared += common
            previous = prompt
        return shared


@dataclass(frozen=True)
class Throughput:
    """What recent batches measured: tokens computed (uncached prompt + output) per second of
    time some batch was running, and each model's mean output tokens per succeeded request."""

    tokens_per_second: float
    busy_seconds: float
    tokens_per_request: float
    output_per_request: dict[str, float]


def measure(records: list[BatchRecord], now: float) -> Throughput:
    """Throughput over the time the given batches ran: their intervals (in progress to ended,
    or to now) merged, so batches running side by side are not counted twice."""
    intervals: list[tuple[float, float]] = []
    tokens = requests = 0
    output: dict[str, list[int]] = {}
    for record in records:
        if record.in_progress_at is None:
            continue
        end = record.ended_at or record.finalizing_at or now
        usage = record.usage
        done = usage.input_tokens - usage.cached_tokens + usage.output_tokens
        if done <= 0:
            continue
        intervals.append((float(record.in_progress_at), float(end)))
        tokens += done
        requests += record.counts.succeeded
        if record.model and "," not in record.model and record.counts.succeeded:
            mean = output.setdefault(record.model, [0, 0])
            mean[0] += usage.output_tokens
            mean[1] += record.counts.succeeded
    busy = 0.0
    current: tuple[float, float] | None = None
    for start, end in sorted(intervals):
        if current is None or start > current[1]:
            if current is not None:
                busy += current[1] - current[0]
            current = (start, end)
        else:
            current = (current[0], max(current[1], end))
    if current is not None:
        busy += current[1] - current[0]
    # Timestamps are whole seconds: a batch that ran within one second counts as one.
    busy = max(busy, 1.0) if intervals else 0.0
    return Throughput(
        tokens_per_second=tokens / busy if busy else 0.0,
        busy_seconds=busy,
        tokens_per_request=tokens / requests if requests else 0.0,
        output_per_request={m: o / n for m, (o, n) in output.items() if n},
    )


def shared_ahead(ahead_requests: int, ahead_each: float, own_each: float) -> int:
    """Tokens the requests ahead compute before the batch's own have finished: continuous
    batching runs every leased sequence side by side at one pace (processor sharing), so
    each request ahead does as much as one of the batch's, or all of its own if less."""
    return round(ahead_requests * min(ahead_each, own_each))


def _recent_batches(services: Services, now: float) -> list[BatchRecord]:
    since = int(now) - RECENT_SECONDS
    records, _ = services.store.console_batches(None, statuses=None, limit=200)
    return [
        r
        for r in records
        if r.in_progress_at is not None and (r.status in _RUNNING or (r.ended_at or 0) >= since)
    ]


def _max_tokens(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _approximate_tokens(body: dict[str, Any]) -> int:
    prompt = {k: v for k, v in body.items() if k in ("messages", "prompt", "input")}
    return max(1, len(orjson.dumps(prompt)) // BYTES_PER_TOKEN)


def count_lines(
    services: Services, data: bytes, endpoint: str
) -> tuple[dict[str, _ModelLines], list[dict[str, Any]], int, int]:
    """Per served model, the file's requests and prompt tokens; the lines that would fail
    (the first few of them) and how many in all; the count of lines. A file that does not validate is a 400 naming
    its first bad line."""
    settings = services.settings
    report = batch_file.validate(
        io.BytesIO(data),
        endpoint,
        max_lines=settings.max_batch_lines,
        max_line_bytes=settings.max_line_bytes,
        max_errors=1,
        max_depth=settings.max_json_depth,
    )
    if not report.ok:
        first = report.errors[0]
        raise InvalidRequest(
            f"The file would fail validation: {first.message}",
            param=first.param,
            code=first.code,
            line=first.line,
        )
    engine = services.engine
    models: dict[str, _ModelLines] = {}
    failing: list[dict[str, Any]] = []
    lines = failed = 0
    for line in batch_file.iter_requests(
        io.BytesIO(data), endpoint, max_line_bytes=settings.max_line_bytes
    ):
        lines += 1
        body = orjson.loads(line.body)
        try:
            plan = dispatch.plan_openai(engine, endpoint, body, Priority.BATCH)
            model = plan.request.model
            tokens = (
                engine.prompt_token_ids(plan.request)
                if isinstance(plan, dispatch.Generate)
                else None
            )
        except BatchdError as exc:
            failed += 1
            if len(failing) < MAX_FAILING_LINES:
                failing.append(
                    {"line": line.line_no, "custom_id": line.custom_id, "message": exc.message}
                )
            continue
        entry = models.setdefault(model, _ModelLines())
        entry.requests += 1
        if tokens is None:
            entry.input_tokens += _approximate_tokens(body)
            entry.exact = False
        else:
            entry.input_tokens += len(tokens)
            entry.prompts.append(tuple(tokens))
        entry.max_tokens.append(_max_tokens(body))
    return models, failing, failed, lines


def estimate(services: Services, data: bytes, endpoint: str) -> dict[str, Any]:
    """The estimate for a batch file's bytes, as the HTTP endpoint answers it."""
    now = time.time()
    models, failing, failed, lines = count_lines(services, data, endpoint)
    measured = measure(_recent_batches(services, now), now)
    queue = services.store.queue_by_tenant()
    ahead_requests = sum(q["pending"] + q["running"] for q in queue.values())
    assumptions = [
        "Prompt tokens are counted with each model's tokenizer and chat template"
        + (
            "; for models served upstream, at four bytes a token."
            if not all(m.exact for m in models.values())
            else "."
        ),
        "Prompt tokens that lines share as a common prefix are counted cached (computed once,"
        " as the engine does within a batch); a prefix cached by earlier work is not"
        " foreseen, and makes the batch cheaper and faster than this.",
    ]
    usages_expected: list[ModelUsage] = []
    usages_max: list[ModelUsage] = []
    per_model: dict[str, Any] = {}
    output_expected = output_max = cached_total = 0
    for model, entry in models.items():
        mean = measured.output_per_request.get(model)
        expected = maximum = 0
        for limit in entry.max_tokens:
            bound = limit if limit is not None else int(mean or 0)
            maximum += bound
            expected += min(bound, round(mean)) if mean is not None else bound
        output_expected += expected
        output_max += maximum
        shared = entry.shared_tokens
        cached_total += shared
        usages_expected.append(ModelUsage(model, entry.input_tokens, shared, expected))
        usages_max.append(ModelUsage(model, entry.input_tokens, shared, maximum))
        per_model[model] = {
            "requests": entry.requests,
            "input_tokens": entry.input_tokens,
            "input_tokens_exact": entry.exact,
            "cached_tokens_expected": shared,
            "output_tokens_expected": expected,
            "output_tokens_max": maximum,
            "measured_output_per_request": round(mean, 1) if mean is not None else None,
        }
        if mean is None:
            assumptions.append(
                f"No recent batch of {model} finished requests: each of its lines is expected"
                " to generate its max_tokens."
            )
        else:
            assumptions.append(
                f"Requests of {model} generated {mean:.1f} tokens on average lately: each line"
                " is expected to generate that, at most its max_tokens."
            )
    input_tokens = sum(m.input_tokens for m in models.values())
    batch_tokens = input_tokens - cached_total + output_expected  # what the engine computes
    ahead_tokens = shared_ahead(
        ahead_requests, measured.tokens_per_request, batch_tokens / lines if lines else 0.0
    )
    seconds: float | None = None
    if measured.tokens_per_second > 0:
        seconds = round((ahead_tokens + batch_tokens) / measured.tokens_per_second, 1)
        assumptions.append(
            f"Throughput {measured.tokens_per_second:.0f} tokens/s (uncached prompt + output),"
            f" measured over {measured.busy_seconds:.0f} s of batches running in the last"
            f" {RECENT_SECONDS // 60} minutes. The {ahead_requests} requests queued or running"
            f" ahead ({measured.tokens_per_request:.0f} tokens each, as lately) share the engine"
            " with this batch's requests, each going at the same pace: until this batch ends"
            " they compute as many tokens each as one of its requests, or their own if fewer."
        )
    else:
        assumptions.append(
            f"No batch ran in the last {RECENT_SECONDS // 60} minutes: there is no measured"
            " throughput to estimate the time from (run a small batch first)."
        )
    return {
        "object": "batch.estimate",
        "endpoint": endpoint,
        "requests": lines,
        "requests_failing": failed,
        "failing_lines": failing,
        "input_tokens": input_tokens,
        "input_tokens_exact": all(m.exact for m in models.values()),
        "cached_tokens_expected": cached_total,
        "output_tokens": {"expected": output_expected, "max": output_max},
        "models": per_model,
        "cost": cost_of(usages_expected, services.prices).to_wire(),
        "cost_max": cost_of(usages_max, services.prices).to_wire(),
        "time": {
            "seconds": seconds,
            "throughput_tokens_per_second": round(measured.tokens_per_second, 1),
            "measured_over_seconds": measured.busy_seconds,
            "queue_ahead_requests": ahead_requests,
            "queue_ahead_tokens": ahead_tokens,
        },
        "assumptions": assumptions,
    }


def estimate_file(services: Services, tenant: str, file_id: str, endpoint: str) -> dict[str, Any]:
    """The estimate for an uploaded file of the tenant's."""
    record = files.get_file(services, tenant, file_id)
    with services.blobs.open(record.blob) as stream:
        data = stream.read()
    return estimate(services, data, endpoint)
