"""llama.cpp sampler chains for a request's sampling parameters.

Greedy requests (temperature 0) get a chain too, but the decode loop samples them with an
argmax straight over the logits row instead (model_runner.py): the chain would first build a
candidate array the size of the vocabulary per sequence per step.
"""

from __future__ import annotations

import random
from typing import Any

import llama_cpp

from batchd.engines.base import SamplingParams


def sampler_chain(params: SamplingParams) -> Any:
    """A new chain (a ctypes pointer), to give back with ``free_sampler``."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if params.temperature <= 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        llama_cpp.llama_sampler_chain_add(
            chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1)
        )
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
    seed = params.seed if params.seed is not None else random.getrandbits(32)
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


def free_sampler(chain: Any) -> None:
    llama_cpp.llama_sampler_free(chain)
