"""Failpoints: named places where a crash test can make a process stop and wait, so that it
can be killed exactly there (``kill -9`` in the middle of finalizing a batch, say).

``BATCHD_FAILPOINTS="finalize.before_commit=sleep(30)"`` (comma-separated for several) makes
the process log ``failpoint finalize.before_commit reached`` and sleep 30 s when it gets there.
Unset, which is every deployment, a failpoint is one dictionary lookup that finds nothing.
"""

from __future__ import annotations

import logging
import os
import re
import time

log = logging.getLogger(__name__)

_SPEC = re.compile(r"^\s*([\w.]+)\s*=\s*sleep\(\s*([0-9.]+)\s*\)\s*$")


def _parse(value: str) -> dict[str, float]:
    points: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        match = _SPEC.match(item)
        if match is None:
            raise ValueError(
                f"BATCHD_FAILPOINTS: cannot read {item!r}; expected name=sleep(seconds)"
            )
        points[match.group(1)] = float(match.group(2))
    return points


_POINTS = _parse(os.environ.get("BATCHD_FAILPOINTS", ""))


def hit(name: str) -> None:
    """Pause here if a failpoint of this name is set (blocking: call it off the event loop)."""
    seconds = _POINTS.get(name)
    if seconds is None:
        return
    log.warning("failpoint %s reached: sleeping %.1f s", name, seconds)
    time.sleep(seconds)
