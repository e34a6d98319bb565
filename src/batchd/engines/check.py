"""``batchd engines check``: probe every upstream of a registry with ``GET {base_url}/models``.

An upstream is "up" when it answers 200 with an OpenAI model list; it is also told whether that
list names the configured ``upstream_model`` (a wrong name is the commonest misconfiguration).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx

from batchd.engines.registry import LlamaCppModel, Registry

PROBE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Probe:
    model: str
    engine: str
    target: str
    up: bool
    detail: str
    latency_ms: float | None = None


async def _probe_url(
    client: httpx.AsyncClient, model: str, url: str, upstream_model: str, key: str | None
) -> Probe:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    started = time.perf_counter()
    try:
        response = await client.get(f"{url}/models", headers=headers)
    except httpx.HTTPError as exc:
        return Probe(model, "openai-http", url, False, f"unreachable: {type(exc).__name__}")
    latency = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        return Probe(model, "openai-http", url, False, f"answered {response.status_code}", latency)
    try:
        served = {item.get("id") for item in response.json().get("data", [])}
    except (ValueError, AttributeError, TypeError):
        return Probe(model, "openai-http", url, False, "not an OpenAI model list", latency)
    if upstream_model in served:
        detail = f"serves {upstream_model}"
    else:
        detail = f"up, but does not list {upstream_model!r}"
    return Probe(model, "openai-http", url, True, detail, latency)


async def check(registry: Registry) -> list[Probe]:
    probes: list[Probe] = []
    tasks = []
    async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_SECONDS, trust_env=False) as client:
        for model_id, entry in registry.models.items():
            if isinstance(entry, LlamaCppModel):
                where = str(entry.path) if entry.path else "bundled SmolLM2-135M-Instruct"
                probes.append(Probe(model_id, "llamacpp", where, True, "embedded"))
                continue
            upstream_model = entry.upstream_model or model_id
            for url in entry.urls:
                tasks.append(
                    _probe_url(client, model_id, url, upstream_model, registry.api_keys[model_id])
                )
        probes.extend(await asyncio.gather(*tasks))
    return probes
