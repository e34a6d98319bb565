"""Fixtures every test folder may use."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.pg import fresh_database


@pytest.fixture()
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database of its own for the test (skipped, saying why, where no
    PostgreSQL server is reachable)."""
    with fresh_database() as url:
        yield url
