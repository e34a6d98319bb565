"""Blobs in a directory: each is written to a temporary name, fsynced, renamed into place and
the directory fsynced, so a committed row never points at a partial file."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from batchd.blobs.base import CHUNK_BYTES, check_name

_TMP_PREFIX = "tmp-"


class DirectoryBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def new_writer(self) -> BlobWriter:
        return BlobWriter(self)

    def open(self, name: str) -> IO[bytes]:
        return self.path(name).open("rb")

    def iter_bytes(self, name: str, chunk: int = CHUNK_BYTES) -> Iterator[bytes]:
        with self.open(name) as handle:
            while data := handle.read(chunk):
                yield data

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def remove_orphans(self, referenced: set[str], *, older_than: float | None = None) -> int:
        """Delete blobs no row points at (left by a crash between write and commit). With
        ``older_than`` (a Unix time), only those last written before it: on a directory
        that other processes share, a younger one may be a write about to be committed."""
        removed = 0
        for entry in self.root.iterdir():
            if not entry.is_file() or entry.name in referenced:
                continue
            if older_than is not None:
                try:
                    if entry.stat().st_mtime >= older_than:
                        continue
                except FileNotFoundError:
                    continue
            entry.unlink(missing_ok=True)
            removed += 1
        return removed

    def fsync_dir(self) -> None:
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class BlobWriter:
    """A blob on its way into a directory: a temporary file, renamed into place on commit."""

    def __init__(self, store: DirectoryBlobStore) -> None:
        self._store = store
        self.name = secrets.token_hex(16)
        self._tmp = store.root / f"{_TMP_PREFIX}{self.name}"
        self._handle: IO[bytes] = self._tmp.open("wb")
        self.size = 0
        # Hashed on the way in (the bytes are never read twice): idempotent uploads compare it.
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self._handle.write(data)
        self.size += len(data)
        self.sha256.update(data)

    def commit(self) -> str:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self._tmp, self._store.path(self.name))
        self._store.fsync_dir()
        return self.name

    def abort(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()
