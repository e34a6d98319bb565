"""The embedded engine's tuning knobs, shared by the facade and every model's decode loop."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineOptions:
    n_threads: int = 2
    ctx_size: int = 135168  # KV cells in all; each sequence gets ctx_size // max_seqs
    max_seqs: int = 66  # two of them kept for realtime requests (realtime_slots)
    n_batch: int = 512  # most tokens in one llama_decode
    prefill_chunk: int = 64  # most prompt tokens of one sequence per step
    default_max_tokens: int = 1024  # when a request sets none
    prefix_sharing: bool = True
    prefix_cache: bool = True  # finished sequences' KV kept in free slots (needs sharing)
    prefix_cache_cells: int = 16384  # the most KV cells the prefix cache keeps in all
    kv_type: str = "f16"  # the KV cache's element type: "f16" or "q8_0" (half the memory)
    batch_seqs_during_realtime: int = 0
    realtime_slots: int = 2  # sequence slots batch work leaves free for realtime requests
