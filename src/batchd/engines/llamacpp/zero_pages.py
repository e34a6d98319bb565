"""Give the KV cache's memory back to the kernel at start-up, so that resident memory follows
the cells sequences actually use.

llama.cpp allocates a model's whole KV cache when the context is made (every sequence slot at
the longest context: 1.5 GB for the default 32 x 2,048 cells of the bundled model) and clears
it with ``memset``, which makes every page resident. A private anonymous page that holds only
zeros can be dropped with ``madvise(MADV_DONTNEED)`` without changing what the program sees:
the next read of it gives zeros again, and the next write gets a fresh page. So right after the
context is made, the 2 MiB chunks of its new memory that are all zeros are dropped, and a page
comes back only when a sequence writes a KV cell into it.

The clear itself would still make the whole cache resident for a moment, which is the
process's peak. So while the context is being made (llama.cpp runs it with the GIL released) a
sweeper thread drops the chunks the ``memset`` has already zeroed, trailing it through the new
mapping; the pass after the context is made remains the one that guarantees every zero chunk is
given back. Racing the ``memset`` is safe because it writes only zeros: a chunk dropped before
or while it is written reads as zeros either way.

Only memory that appeared while the context was made is looked at: a whole mapping that did
not exist before (no neighbour's memory merged into it) and is at least half the size the KV
cache must have. The check and the ``madvise`` run with the GIL held (``ctypes.PyDLL``), so no
Python thread can write between them; the only other threads that could run are other models'
decode threads, whose memory predates the snapshot. Elsewhere than on Linux this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CHUNK = 1 << 21  # bytes checked and dropped at a time (a multiple of any page size)
_MADV_DONTNEED = 4
_ZEROS = (ctypes.c_char * CHUNK)()  # compared against, never written
_ZEROS_ADDRESS = ctypes.addressof(_ZEROS)

Region = tuple[int, int]  # [start, end) addresses


def anonymous_regions(maps: Path = Path("/proc/self/maps")) -> list[Region]:
    """The private anonymous read-write mappings of this process (no file, no name)."""
    try:
        text = maps.read_text()
    except OSError:
        return []
    regions = []
    for line in text.splitlines():
        fields = line.split()
        # address perms offset dev inode [pathname]: anonymous ones have no pathname.
        if len(fields) != 5 or not fields[1].startswith("rw") or fields[1][3] != "p":
            continue
        start, _, end = fields[0].partition("-")
        regions.append((int(start, 16), int(end, 16)))
    return regions


def new_regions(before: list[Region], after: list[Region], at_least: int) -> list[Region]:
    """The mappings of ``after`` of ``at_least`` bytes or more that overlap nothing of
    ``before``: memory that appeared in between, with nothing older merged into it."""
    return [
        (start, end)
        for start, end in after
        if end - start >= at_least and not any(s < end and start < e for s, e in before)
    ]


def _libc() -> ctypes.PyDLL:
    libc = ctypes.PyDLL(None)  # PyDLL keeps the GIL across each call
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.madvise.restype = ctypes.c_int
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    libc.mincore.restype = ctypes.c_int
    libc.memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    libc.memcmp.restype = ctypes.c_int
    return libc


def resident_chunks(libc: ctypes.PyDLL, first: int, count: int) -> list[int]:
    """The addresses of the ``CHUNK``s from ``first`` (chunk-aligned) on that have any page
    resident (``mincore``): the only ones a clear has written, and so worth a look."""
    page = mmap.PAGESIZE
    pages = count * CHUNK // page
    vector = np.zeros(pages, dtype=np.uint8)
    if libc.mincore(first, count * CHUNK, vector.ctypes.data) != 0:
        return [first + i * CHUNK for i in range(count)]  # cannot tell: look at them all
    touched = (vector.reshape(count, CHUNK // page) & 1).any(axis=1)
    return [first + int(i) * CHUNK for i in np.flatnonzero(touched)]


def release_zero_chunks(start: int, end: int, stop: threading.Event | None = None) -> int:
    """Drop every whole ``CHUNK`` of [start, end) that is resident and holds only zeros; the
    bytes dropped. With ``stop``, the walk ends early once it is set (the sweep while a
    context is made hands over to the final pass the moment the context exists)."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = _libc()
    first = -(-start // CHUNK) * CHUNK  # the first chunk boundary at or after start
    count = max(0, (end - first) // CHUNK)
    released = 0
    for at in resident_chunks(libc, first, count):
        if stop is not None and stop.is_set():
            break
        if (
            libc.memcmp(at, _ZEROS_ADDRESS, CHUNK) == 0
            and libc.madvise(at, CHUNK, _MADV_DONTNEED) == 0
        ):
            released += CHUNK
    return released


def kv_cache_bytes(model: object, cells: int, bytes_per_value: float) -> int:
    """The size llama.cpp's KV cache of ``cells`` cells takes for ``model``."""
    import llama_cpp

    n_layer = llama_cpp.llama_model_n_layer(model)
    n_embd = llama_cpp.llama_model_n_embd(model)
    n_head = max(1, llama_cpp.llama_model_n_head(model))
    n_head_kv = llama_cpp.llama_model_n_head_kv(model)
    per_cell = 2 * n_layer * n_head_kv * (n_embd // n_head)  # K and V, every layer
    return int(cells * per_cell * bytes_per_value)


def release_new_zero_memory(before: list[Region], at_least: int) -> int:
    """Drop the zero chunks of the mappings of at least ``at_least`` bytes that appeared
    since ``before`` (an ``anonymous_regions()`` snapshot); the bytes dropped."""
    if not before:
        return 0
    released = 0
    for start, end in new_regions(before, anonymous_regions(), at_least):
        released += release_zero_chunks(start, end)
    return released


class Sweep:
    """What a sweep while a context was made gave back."""

    released = 0


@contextmanager
def released_while_made(
    before: list[Region], at_least: int, pause: float = 0.002
) -> Iterator[Sweep]:
    """Around the call that makes a llama.cpp context: keep dropping the zero chunks of new
    mappings of at least ``at_least`` bytes (see the module's docstring) until it returns."""
    sweep = Sweep()
    if not before or not sys.platform.startswith("linux"):
        yield sweep
        return
    made = threading.Event()

    def run() -> None:
        while not made.wait(pause):
            for start, end in new_regions(before, anonymous_regions(), at_least):
                sweep.released += release_zero_chunks(start, end, stop=made)

    sweeper = threading.Thread(target=run, name="kv-zero-pages", daemon=True)
    sweeper.start()
    try:
        yield sweep
    finally:
        made.set()
        sweeper.join()
