"""How batchd loads models into llama.cpp."""

from __future__ import annotations

from pathlib import Path

from batchd.engines.llamacpp import model_files as llama_model


def test_amx_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n")
    assert llama_model.cpu_has_amx(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f\n")
    assert not llama_model.cpu_has_amx(cpuinfo)
    assert not llama_model.cpu_has_amx(tmp_path / "missing")


def test_the_extra_buffer_types_are_off_exactly_on_amx_cpus() -> None:
    # On AMX, llama.cpp's AMX weight buffer crashed decoding: batchd keeps the weights out of it.
    assert llama_model.model_params().use_extra_bufts == (not llama_model.cpu_has_amx())
