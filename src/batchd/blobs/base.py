"""Where file bytes live: server-named blobs behind one protocol. ``local.py`` keeps them in a
directory (``<data_dir>/files`` by default, a shared volume for many processes); ``s3.py`` in
S3-compatible object storage (``BATCHD_FILES_URL=s3://bucket/prefix``).

Every blob is complete and durable before the database row that points at it is committed,
so a committed row never points at a partial file. Client filenames are metadata only and
never name a blob.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import IO, Protocol

CHUNK_BYTES = 1024 * 1024


class Writer(Protocol):
    """Append bytes, then ``commit()`` to get the durable blob name (or ``abort()``)."""

    size: int
    sha256: hashlib._Hash

    def write(self, data: bytes) -> None: ...
    def commit(self) -> str: ...
    def abort(self) -> None: ...


class BlobStore(Protocol):
    """What the API and the scheduler need of a place for file bytes."""

    def new_writer(self) -> Writer: ...
    def open(self, name: str) -> IO[bytes]: ...
    def iter_bytes(self, name: str, chunk: int = CHUNK_BYTES) -> Iterator[bytes]: ...
    def delete(self, name: str) -> None: ...
    def remove_orphans(self, referenced: set[str], *, older_than: float | None = None) -> int: ...


def check_name(name: str) -> str:
    """Blob names are ours (hex tokens); refuse anything that could leave the store."""
    if "/" in name or name.startswith(".") or not name:
        raise ValueError(f"invalid blob name {name!r}")
    return name
