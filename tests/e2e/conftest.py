"""Fixtures of the end-to-end tests: one real server (real engine, bundled model) shared by
the tests that only need one, and an SDK client for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.helpers import API_KEY, OTHER_KEY
from tests.support.serverproc import ServerProcess, running_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server (real engine, bundled model) shared by the tests that only need one."""
    data_dir = tmp_path_factory.mktemp("batchd-data")
    with running_server(data_dir, BATCHD_API_KEYS=f"{API_KEY},{OTHER_KEY}") as srv:
        yield srv


@pytest.fixture()
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_base_url, api_key=API_KEY, max_retries=0)


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"
