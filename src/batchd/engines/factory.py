"""Building the configured engine (the one place that imports an engine implementation).

Each engine is built whole by its constructor: nothing here reaches into one afterwards.
"""

from __future__ import annotations

from batchd.config import Settings
from batchd.engines import registry
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
    if settings.config is not None:
        return build_from_registry(registry.load(settings.config), settings)
    if settings.engine == "fake":
        from batchd.engines.fake import FakeEngine

        return FakeEngine(step_seconds=settings.fake_step_seconds, max_seqs=settings.max_seqs)
    from batchd.engines.llamacpp.engine import LlamaCppEngine
    from batchd.engines.llamacpp.model_files import model_specs

    return LlamaCppEngine(
        models=model_specs(parse_model_specs(settings.models)),
        data_dir=settings.data_dir,
        quant=settings.quant,
        n_threads=settings.n_threads,
        ctx_size=settings.ctx_size,
        max_seqs=settings.max_seqs,
        prefix_sharing=settings.prefix_sharing,
        prefix_cache=settings.prefix_cache,
        prefix_cache_cells=settings.prefix_cache_cells,
        kv_type=settings.kv_type,
    )


def build_from_registry(reg: registry.Registry, settings: Settings) -> Engine:
    """A router over one embedded engine (every ``llamacpp`` model, sharing its decode
    threads and KV cache) and one ``openai-http`` engine per upstream model."""
    from batchd.engines.openai_http.engine import OpenAIHttpEngine
    from batchd.engines.router import RouterEngine

    engines: list[Engine] = []
    embedded = reg.llamacpp_models()
    if embedded:
        from batchd.engines.llamacpp.engine import LlamaCppEngine
        from batchd.engines.llamacpp.model_files import bundled_gguf, model_spec

        options = reg.llamacpp
        engine = LlamaCppEngine(
            # The config's aliases, not the engine's own ("default" for the first model); a
            # model without a path is the bundled one, converted to Q8_0 like the default.
            models=[
                model_spec(
                    model_id,
                    entry.path or bundled_gguf(),
                    tuple(entry.aliases),
                    bundled=entry.path is None,
                )
                for model_id, entry in embedded.items()
            ],
            data_dir=settings.data_dir,
            quant=options.quant or settings.quant,
            n_threads=options.n_threads or settings.n_threads,
            ctx_size=options.ctx_size or settings.ctx_size,
            max_seqs=options.max_seqs or settings.max_seqs,
            prefix_sharing=(
                settings.prefix_sharing
                if options.prefix_sharing is None
                else options.prefix_sharing
            ),
            prefix_cache=(
                settings.prefix_cache if options.prefix_cache is None else options.prefix_cache
            ),
            prefix_cache_cells=(
                settings.prefix_cache_cells
                if options.prefix_cache_cells is None
                else options.prefix_cache_cells
            ),
            kv_type=options.kv_type or settings.kv_type,
        )
        engines.append(engine)
    for model_id, entry in reg.upstream_models().items():
        engines.append(OpenAIHttpEngine(model_id, entry, reg.api_keys[model_id]))
    return RouterEngine(engines)
