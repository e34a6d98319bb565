"""What this process's engines did over the last hour, minute by minute: tokens generated
for realtime requests and for batch work. The console's operator view charts the share of
each; Prometheus has the same tokens as counters (metrics.COMPLETION_TOKENS), but a chart in
the console must not need a Prometheus server.

Process-wide, like the Prometheus registry: every engine reports through
``metrics.count_tokens``, which calls ``record``. In a deployment of an API process and
workers, each process knows its own engines only (the API's realtime answers, the workers'
batch rows); the console shows the process that serves it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

MINUTES = 60


class EngineActivity:
    def __init__(self, clock: Callable[[], float] = time.time, minutes: int = MINUTES) -> None:
        self._clock = clock
        self._minutes = minutes
        self._lock = threading.Lock()
        # minute index -> [realtime tokens, batch tokens]
        self._buckets: dict[int, list[int]] = {}

    def record(self, realtime: bool, tokens: int) -> None:
        if tokens <= 0:
            return
        minute = int(self._clock() // 60)
        with self._lock:
            bucket = self._buckets.get(minute)
            if bucket is None:
                bucket = self._buckets[minute] = [0, 0]
                for old in [m for m in self._buckets if m <= minute - self._minutes]:
                    del self._buckets[old]
            bucket[0 if realtime else 1] += tokens

    def last_hour(self) -> dict[str, Any]:
        """One point a minute, oldest first (the current minute last), and the hour's totals:
        tokens generated for realtime requests and for batch work, and realtime's share."""
        now_minute = int(self._clock() // 60)
        with self._lock:
            buckets = {m: list(b) for m, b in self._buckets.items()}
        points = []
        totals = [0, 0]
        for minute in range(now_minute - self._minutes + 1, now_minute + 1):
            realtime, batch = buckets.get(minute, (0, 0))
            totals[0] += realtime
            totals[1] += batch
            points.append({"minute": minute * 60, "realtime": realtime, "batch": batch})
        generated = totals[0] + totals[1]
        return {
            "points": points,
            "realtime_tokens": totals[0],
            "batch_tokens": totals[1],
            "realtime_share": round(totals[0] / generated, 4) if generated else 0.0,
        }


ACTIVITY = EngineActivity()
