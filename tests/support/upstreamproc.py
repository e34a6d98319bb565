"""llama-cpp-python's own OpenAI-compatible server (``python -m llama_cpp.server``) serving the
bundled model on a free port: the real upstream the upstream-engine tests and benchmark use."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from batchd.engines.llamacpp.model_files import bundled_gguf
from tests.support.serverproc import free_port, stop_process

UPSTREAM_MODEL = "smollm2-upstream"
STARTUP_TIMEOUT_SECONDS = 120


# llama-cpp-python's server, loading its model with the parameters batchd uses (on an AMX CPU
# llama.cpp's AMX weight buffer crashes decoding; see batchd.engines.llamacpp.model_files.model_params).
_SERVER_WITH_BATCHD_MODEL_PARAMS = """
import runpy
import llama_cpp.llama_cpp
from batchd.engines.llamacpp.model_files import model_params
llama_cpp.llama_cpp.llama_model_default_params = model_params
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


@contextlib.contextmanager
def llama_server(log_dir: Path, *, n_threads: int = 1, embedding: bool = False) -> Iterator[str]:
    """Yield the server's base URL (``http://127.0.0.1:PORT``; the API is under ``/v1``)."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"llama-server-{port}.log"
    command = [
        sys.executable,
        "-c",
        _SERVER_WITH_BATCHD_MODEL_PARAMS,
        "--model",
        str(bundled_gguf()),
        "--model_alias",
        UPSTREAM_MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        "--n_threads",
        str(n_threads),
        "--verbose",
        "False",
    ]
    if embedding:
        command += ["--embedding", "True"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama_cpp.server did not start:\n{log_path.read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        stop_process(proc, timeout=20)
