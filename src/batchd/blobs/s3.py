"""File bytes in S3-compatible object storage (AWS S3, MinIO, Ceph RGW, R2...), for many
processes on many machines that share no volume: ``BATCHD_FILES_URL=s3://bucket/prefix``.

Credentials and region come from boto3's usual chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, a profile, an instance role); ``BATCHD_S3_ENDPOINT_URL`` points at
a server other than AWS. An object appears only when its upload completes (a multipart upload
that never completes leaves no object), so as with the directory store a committed database
row never names a partial blob. Needs the ``s3`` extra: ``pip install 'batchd[s3]'``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import secrets
import tempfile
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import urlparse

from batchd.blobs.base import CHUNK_BYTES, check_name
from batchd.errors import BlobUrlError

# Uploads are spooled here until commit: in memory up to this size, then on local disk.
SPOOL_MEMORY_BYTES = 8 * 1024 * 1024


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix/")."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise BlobUrlError(f"not an s3://bucket/prefix URL: {url[:80]!r}")
    prefix = parsed.path.strip("/")
    return parsed.netloc, f"{prefix}/" if prefix else ""


class _BodyReader(io.RawIOBase):
    """A raw stream over an S3 GetObject body, so that a BufferedReader gives callers
    ``readline(limit)`` (the JSONL validator reads line by line) at network chunk sizes."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        super().close()


class S3BlobStore:
    def __init__(self, url: str, *, endpoint_url: str | None = None) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise BlobUrlError(
                f"{url} needs boto3: install the s3 extra (pip install 'batchd[s3]')"
            ) from None
        self.bucket, self.prefix = parse_s3_url(url)
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            # Retries with backoff for throttling and transient 5xx, as AWS recommends.
            config=Config(retries={"max_attempts": 8, "mode": "adaptive"}),
        )

    def check_reachable(self) -> None:
        """Fail at start-up, naming the bucket, rather than on the first upload."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise BlobUrlError(f"cannot reach bucket {self.bucket!r}: {exc}") from None

    def key(self, name: str) -> str:
        return self.prefix + check_name(name)

    def new_writer(self) -> S3BlobWriter:
        return S3BlobWriter(self)

    def open(self, name: str) -> IO[bytes]:
        body = self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"]
        return io.BufferedReader(_BodyReader(body), buffer_size=CHUNK_BYTES)

    def iter_bytes(self, name: str, chunk: int = CHUNK_BYTES) -> Iterator[bytes]:
        body = self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"]
        try:
            yield from body.iter_chunks(chunk)
        finally:
            body.close()

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(name))

    def remove_orphans(self, referenced: set[str], *, older_than: float | None = None) -> int:
        """Delete objects under the prefix that no row points at; with ``older_than`` (a
        Unix time), only those written before it (a younger one may be an upload whose row
        is about to be committed by another process)."""
        removed = 0
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        for page in pages:
            for item in page.get("Contents", []):
                name = item["Key"][len(self.prefix) :]
                if not name or "/" in name or name in referenced:
                    continue
                if older_than is not None and item["LastModified"].timestamp() >= older_than:
                    continue
                self.client.delete_object(Bucket=self.bucket, Key=item["Key"])
                removed += 1
        return removed


class S3BlobWriter:
    """Bytes spooled locally (memory, then disk), uploaded on commit; boto3 switches to a
    multipart upload for large files, and an aborted one leaves no object behind."""

    def __init__(self, store: S3BlobStore) -> None:
        self._store = store
        self.name = secrets.token_hex(16)
        # Lives until commit() or abort() closes it.
        self._spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)  # noqa: SIM115
        self.size = 0
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self._spool.write(data)
        self.size += len(data)
        self.sha256.update(data)

    def commit(self) -> str:
        try:
            self._spool.seek(0)
            self._store.client.upload_fileobj(
                self._spool, self._store.bucket, self._store.key(self.name)
            )
        finally:
            self._spool.close()
        return self.name

    def abort(self) -> None:
        self._spool.close()

    def __enter__(self) -> S3BlobWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()
