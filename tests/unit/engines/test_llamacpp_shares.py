"""How many requests the embedded engine takes of each model it serves: capacity is every
model's share, and a model holding its share is skipped by the scheduler's leasing, so an
embeddings batch and a generation batch cannot take each other's slots. Nothing is loaded:
the engine is only constructed, and requests are counted as the engine counts them."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from batchd.engines.llamacpp.embedding_files import EMBEDDING_MODEL_ID
from batchd.engines.llamacpp.engine import LlamaCppEngine
from batchd.engines.llamacpp.model_files import bundled_model_spec


def test_each_model_has_its_share_and_is_skipped_when_it_holds_it(tmp_path: Path) -> None:
    engine = LlamaCppEngine(models=[], data_dir=tmp_path, max_seqs=4)
    assert engine.embedder is not None  # the bundled embedding model comes with the default
    generation = bundled_model_spec().id
    # No embedding work: only the generation model's share, so a worker leases no more
    # generation rows than it runs.
    assert engine.capacity() == 2 * 4
    assert engine.unavailable_models() == []
    with ExitStack() as held:
        for _ in range(2 * engine.embedder.max_seqs):
            held.enter_context(engine._counted(EMBEDDING_MODEL_ID))
        assert engine.capacity() == 2 * 4 + 2 * engine.embedder.max_seqs
        assert engine.unavailable_models() == [EMBEDDING_MODEL_ID]
        for _ in range(2 * 4 - 1):
            held.enter_context(engine._counted(generation))
        assert engine.unavailable_models() == [EMBEDDING_MODEL_ID]
        held.enter_context(engine._counted(generation))
        # The generation model by every name a batch line may use for it.
        assert sorted(engine.unavailable_models()) == sorted(
            ["default", generation, EMBEDDING_MODEL_ID]
        )
    assert engine.unavailable_models() == []
