"""Start a real ``batchd serve`` subprocess on a free port in a temporary data dir."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

STARTUP_TIMEOUT_SECONDS = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    @staticmethod
    def command() -> list[str]:
        """The ``batchd`` command line, before its subcommand."""
        return [sys.executable, "-m", "batchd.cli"]

    @staticmethod
    def environment(env: dict[str, str]) -> dict[str, str]:
        """This process's environment with ``env`` on top, and a small engine by default."""
        merged = {**os.environ, **env}
        merged.setdefault("BATCHD_MAX_SEQS", "16")
        merged.setdefault("BATCHD_CTX_SIZE", "8192")
        return merged

    def start(self) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / f"server-{self.port}-{int(time.time() * 1000)}.log"
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*self.command(), "serve", "--port", str(self.port), "--data-dir", str(self.data_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.environment(self.env),
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


@contextlib.contextmanager
def running_server(data_dir: Path, **env: str) -> Iterator[ServerProcess]:
    server = ServerProcess(data_dir=data_dir, env=env).start()
    try:
        yield server
    finally:
        server.stop()
