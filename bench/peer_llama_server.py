"""llama.cpp's own C++ programs as peers (``llama-server``, ``llama-batched-bench``): built
from the vendored llama.cpp inside the llama-cpp-python source package (the same engine batchd
embeds), cached after the first build.

Returns None, with the reason printed, wherever one cannot be built or started here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

CACHE = Path(os.environ.get("BATCHD_BENCH_CACHE", Path.home() / ".cache" / "batchd-bench"))
LLAMA_CPP_PYTHON_VERSION = "0.3.36"


def _log(message: str) -> None:
    print(f"   [peer] {message}", flush=True)


TOOLS = ("llama-server", "llama-batched-bench")
_ENV = {"llama-server": "LLAMA_SERVER", "llama-batched-bench": "LLAMA_BATCHED_BENCH"}


def find_or_build(tool: str = "llama-server") -> Path | None:
    """``tool`` (one of ``TOOLS``): from its environment variable, the cache, or built (every
    tool at once, since the library is most of the build)."""
    explicit = os.environ.get(_ENV[tool])
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    binary = CACHE / tool / tool
    if binary.is_file():
        return binary
    if not shutil.which("cmake"):
        _log(f"cmake is not installed: cannot build {tool}")
        return None
    with tempfile.TemporaryDirectory(prefix="llama-cpp-build-") as tmp:
        work = Path(tmp)
        _log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} source package")
        got = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(work)],
            capture_output=True, text=True,
        )  # fmt: skip
        archives = list(work.glob("llama_cpp_python-*.tar.gz"))
        if got.returncode != 0 or not archives:
            _log(f"could not download the source package: {got.stderr.strip()[-300:]}")
            return None
        with tarfile.open(archives[0]) as archive:
            archive.extractall(work, filter="data")
        source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
        if source is None:
            _log("the source package has no vendored llama.cpp")
            return None
        _log(f"building {', '.join(TOOLS)} (a few minutes on 2 cores)")
        build = work / "build"
        steps = [
            ["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
             "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_CURL=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"],
            ["cmake", "--build", str(build), "--target", *TOOLS, "-j", str(os.cpu_count() or 2)],
        ]  # fmt: skip
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                _log(f"build failed: {(done.stderr or done.stdout).strip()[-500:]}")
                return None
        for name in TOOLS:
            built = next((p for p in build.rglob(name) if p.is_file()), None)
            if built is None:
                _log(f"the build produced no {name} binary")
                continue
            (CACHE / name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(built, CACHE / name / name)
    return binary if binary.is_file() else None


def batched_bench(
    binary: Path,
    model: Path,
    *,
    threads: int,
    prompt: int,
    generated: int,
    sequences: int,
    shared_prompt: bool = False,
) -> dict[str, float] | None:
    """llama.cpp's own batched decode of ``sequences`` x (``prompt`` + ``generated``) tokens
    (one KV stream per sequence, as batchd runs): the row of its table, or None. With
    ``shared_prompt`` (``-pps``) the prompt is computed once and copied to every sequence."""
    rows = batched_bench_rows(
        binary, model, threads=threads, prompt=prompt, generated=generated,
        sequences=[sequences], shared_prompt=shared_prompt,
    )  # fmt: skip
    return rows[0] if rows else None


def batched_bench_rows(
    binary: Path,
    model: Path,
    *,
    threads: int,
    prompt: int,
    generated: int,
    sequences: list[int],
    shared_prompt: bool = False,
) -> list[dict[str, float]]:
    """One ``llama-batched-bench`` process running each entry of ``sequences`` in turn (a
    width may repeat, to measure it more than once): its rows in that order, or [] if it
    printed none."""
    ctx = max(sequences) * (prompt + generated) + 256
    widths = ",".join(str(s) for s in sequences)
    done = subprocess.run(
        [str(binary), "-m", str(model), "-c", str(ctx), "-b", "512", "-ub", "512",
         "-npp", str(prompt), "-ntg", str(generated), "-npl", widths,
         "-t", str(threads), "-tb", str(threads), *(["-pps"] if shared_prompt else [])],
        capture_output=True, text=True,
    )  # fmt: skip
    keys = ("pp", "tg", "b", "n_kv", "t_pp", "s_pp", "t_tg", "s_tg", "t", "s")
    rows = []
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0] == str(prompt) and cells[2].isdigit():
            rows.append(dict(zip(keys, map(float, cells), strict=True)))
    if not rows:
        _log(f"llama-batched-bench printed no result: {(done.stderr or done.stdout)[-500:]}")
    return rows


@contextlib.contextmanager
def llama_server(binary: Path, model: Path, port: int, slots: int, ctx: int) -> Iterator[str]:
    with tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log") as log:
        proc = subprocess.Popen(
            [str(binary), "-m", str(model), "--port", str(port), "--host", "127.0.0.1",
             "-np", str(slots), "-c", str(ctx), "-t", str(os.cpu_count() or 2), "--no-webui"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(Path(log.name).read_text()[-2000:])
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("llama-server did not become healthy")
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)
