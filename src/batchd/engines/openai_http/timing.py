"""The time sources of the openai-http engine, in one object so a test can replace them all.

The system's by default. A test passes a clock whose ``sleep`` advances a fake time, so the
retry loop's backoff and Retry-After spacing are checked exactly and without waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Clock:
    wall: Callable[[], float] = time.time  # epoch seconds: request deadlines are wall-clock
    monotonic: Callable[[], float] = time.monotonic  # when a blocked URL takes requests again
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # between attempts


SYSTEM_CLOCK = Clock()
