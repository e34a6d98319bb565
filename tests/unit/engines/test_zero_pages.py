"""Dropping zero pages of memory that appeared while a llama.cpp context was made: which
mappings count as new, and that dropping changes no byte a reader sees."""

from __future__ import annotations

import ctypes
import mmap
import sys
import time
from pathlib import Path

import pytest

from batchd.engines.llamacpp.zero_pages import (
    CHUNK,
    anonymous_regions,
    new_regions,
    release_zero_chunks,
    released_while_made,
)

MAPS = """\
55d0c0000000-55d0c0021000 r--p 00000000 08:01 1234    /usr/bin/python3.11
55d0c2000000-55d0c2400000 rw-p 00000000 00:00 0       [heap]
7f0000000000-7f0040000000 rw-p 00000000 00:00 0
7f0040000000-7f0040001000 ---p 00000000 00:00 0
7f0050000000-7f0050200000 rw-s 00000000 00:05 99      /dev/shm/x
7f0060000000-7f0060100000 rw-p 00000000 00:00 0
"""


def test_only_private_anonymous_read_write_mappings_are_listed(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(MAPS)
    assert anonymous_regions(maps) == [
        (0x7F0000000000, 0x7F0040000000),
        (0x7F0060000000, 0x7F0060100000),
    ]
    assert anonymous_regions(tmp_path / "missing") == []


def test_a_mapping_is_new_only_if_nothing_older_is_merged_into_it() -> None:
    before = [(100, 200), (1000, 1100)]
    after = [
        (100, 200),  # as it was
        (200, 900),  # appeared: adjacent, not overlapping
        (950, 1100),  # an older mapping grew into it: not new
        (5000, 5010),  # new but small
    ]
    assert new_regions(before, after, at_least=50) == [(200, 900)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise semantics of Linux")
def test_zero_chunks_are_dropped_and_every_byte_reads_the_same() -> None:
    size = 6 * CHUNK
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region[:] = bytes(size)  # touched, as llama.cpp's memset does
        region[2 * CHUNK + 5] = 7  # one chunk holds data
        start = ctypes.addressof(ctypes.c_char.from_buffer(region))
        released = release_zero_chunks(start, start + size)
        aligned_chunks = (start + size) // CHUNK - (-(-start // CHUNK))
        assert released == (aligned_chunks - 1) * CHUNK  # every whole chunk but the one
        assert region[2 * CHUNK + 5] == 7
        assert region[: 2 * CHUNK + 5] == bytes(2 * CHUNK + 5)
        assert region[2 * CHUNK + 6 :] == bytes(size - 2 * CHUNK - 6)
        region[CHUNK + 1] = 9  # a dropped page takes writes again
        assert region[CHUNK + 1] == 9
    finally:
        region.close()


def _resident_chunks(start: int, size: int) -> int:
    """How many whole CHUNKs of [start, start + size) have any page resident (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    base = start - start % page
    pages = (start + size - base + page - 1) // page
    vec = (ctypes.c_ubyte * pages)()
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    assert libc.mincore(ctypes.c_void_p(base), ctypes.c_size_t(pages * page), vec) == 0
    per_chunk = CHUNK // page
    return sum(any(vec[i : i + per_chunk]) for i in range(0, pages, per_chunk))


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_LIBC.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FIXED = 0x10
_PROT_NONE = 0


def _reserve(size: int) -> int:
    """An inaccessible reservation of ``size`` bytes and a page on each side."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    base = _LIBC.mmap(None, size + 2 * mmap.PAGESIZE, _PROT_NONE, flags, -1, 0)
    assert base not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    return int(base)


def _map_inside(base: int, size: int) -> int:
    """A read-write anonymous mapping inside ``base``'s reservation, between its two guard
    pages: no neighbouring read-write mapping can be merged into it (the sweeper rightly
    skips a mapping that older memory was merged into, and where the kernel puts a plain
    mmap, beside which older mapping, depends on everything the test run did before)."""
    start = base + mmap.PAGESIZE
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED
    got = _LIBC.mmap(start, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    assert got == start, ctypes.get_errno()
    return start


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise semantics of Linux")
def test_the_sweep_trails_a_clear_that_is_still_running_and_keeps_data() -> None:
    # A mapping that appears inside the block and is zeroed chunk by chunk, as llama.cpp's
    # clear does while the context is made: the sweeper gives chunks back behind the writer,
    # so they are never all resident at once, and a chunk holding data is never dropped.
    size = 16 * CHUNK
    base = _reserve(size)
    before = anonymous_regions()
    try:
        with released_while_made(before, at_least=size // 2, pause=0.001):
            start = _map_inside(base, size)
            ctypes.memset(start + 3, 1, 1)  # data written first, as if by something else
            most = 0
            for chunk in range(size // CHUNK):
                if chunk:
                    ctypes.memset(start + chunk * CHUNK, 0, CHUNK)
                else:  # the data's chunk written whole, data kept
                    ctypes.memmove(start, ctypes.string_at(start, CHUNK), CHUNK)
                time.sleep(0.02)  # the GIL is free meanwhile, as in llama.cpp's C code
                most = max(most, _resident_chunks(start, size))
        assert ctypes.string_at(start + 3, 1) == b"\x01"  # must survive
        assert most < size // CHUNK // 2  # never even half resident at once
    finally:
        _LIBC.munmap(base, size + 2 * mmap.PAGESIZE)
