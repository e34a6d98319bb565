"""Building the configured engine (the one place that imports an engine implementation)."""

from __future__ import annotations

from batchd.config import Settings
from batchd.engines.base import Engine


def parse_model_specs(specs: list[str]) -> list[tuple[str, str]]:
    """``name=path.gguf`` (or a bare path, named after its file) -> (name, path) pairs."""
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            name = spec.rsplit("/", 1)[-1].removesuffix(".gguf")
        pairs.append((name.strip(), path.strip()))
    return pairs


def build_engine(settings: Settings) -> Engine:
    if settings.engine == "fake":
        from batchd.engines.fake import FakeEngine

        return FakeEngine(step_seconds=0.01, max_seqs=settings.max_seqs)
    from batchd.engines.llamacpp_engine import LlamaCppEngine

    return LlamaCppEngine(
        models=parse_model_specs(settings.models),
        data_dir=settings.data_dir,
        quant=settings.quant,
        n_threads=settings.n_threads,
        ctx_size=settings.ctx_size,
        max_seqs=settings.max_seqs,
        prefix_sharing=settings.prefix_sharing,
    )
