"""The one clock of batchd's records: whole epoch seconds, as every timestamp column stores."""

from __future__ import annotations

import time


def now() -> int:
    return int(time.time())
