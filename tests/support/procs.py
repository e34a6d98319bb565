"""batchd processes started by tests (``batchd api``, ``batchd worker``...) with their logs, and
the environment that puts several of them on one PostgreSQL database."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.serverproc import stop_process


def shared_database_env(
    postgres_url: str, data_dir: Path, api_keys: str, **extra: str
) -> dict[str, str]:
    """The settings every process of one deployment shares: the database, the data dir (the
    shared volume), the keys, a short poll interval; ``extra`` on top (``BATCHD_MAX_SEQS``...)."""
    return {
        "BATCHD_DATABASE_URL": postgres_url,
        "BATCHD_DATA_DIR": str(data_dir),
        "BATCHD_API_KEYS": api_keys,
        "BATCHD_POLL_INTERVAL_SECONDS": "0.2",
        **extra,
    }


@dataclass
class Proc:
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchd.cli", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        return self

    def log(self) -> str:
        """The whole log (search it); print ``tail()`` in assertion messages."""
        return self.log_path.read_text(errors="replace")

    def tail(self) -> str:
        return self.log()[-4000:]

    def wait_for_log(self, needle: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log():
            assert self.proc is not None
            assert self.proc.poll() is None, f"exited early:\n{self.tail()}"
            assert time.monotonic() < deadline, f"no {needle!r} in:\n{self.tail()}"
            time.sleep(0.2)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)
        self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def wait_healthy(api: Proc, port: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        assert api.proc is not None and api.proc.poll() is None, api.tail()
        assert time.monotonic() < deadline, api.tail()
        time.sleep(0.2)
