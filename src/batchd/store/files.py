"""Uploaded and result files: their rows (the bytes live in the blob store, named by ``blob``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, insert, select

from batchd import failpoints
from batchd.store import schema
from batchd.store.idempotency import record_key
from batchd.store.records import BatchStatus, FileRecord, IdempotencyKey


def file_values(record: FileRecord) -> dict[str, Any]:
    """The files row of ``record``, to insert."""
    return {
        "id": record.id,
        "tenant": record.tenant,
        "filename": record.filename,
        "purpose": record.purpose,
        "bytes": record.bytes,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "blob": record.blob,
    }


def file_record(row: Any) -> FileRecord:
    """The record of a ``select(files)`` row."""
    return FileRecord(
        id=row.id,
        tenant=row.tenant,
        filename=row.filename,
        purpose=row.purpose,
        bytes=row.bytes,
        created_at=row.created_at,
        expires_at=row.expires_at,
        blob=row.blob,
    )


class FilesMixin:
    engine: Engine

    def create_file(self, record: FileRecord, idempotency: IdempotencyKey | None = None) -> None:
        """Insert a file row, and its create's idempotency key in the same transaction."""
        with self.engine.begin() as conn:
            record_key(conn, idempotency, record.id)
            conn.execute(insert(schema.files).values(**file_values(record)))
            failpoints.hit("create_file.before_commit")

    def get_file(self, tenant: str, file_id: str) -> FileRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(schema.files).where(
                    schema.files.c.id == file_id, schema.files.c.tenant == tenant
                )
            ).first()
        return file_record(row) if row else None

    def list_files(
        self, tenant: str, *, purpose: str | None, after: str | None, limit: int, order: str
    ) -> tuple[list[FileRecord], bool]:
        """A page of ``tenant``'s files in upload order (``order``: "asc" or "desc"), past
        the file ``after`` if given, and whether more follow. An unknown cursor: no page."""
        t = schema.files
        query = select(t).where(t.c.tenant == tenant)
        if purpose:
            query = query.where(t.c.purpose == purpose)
        with self.engine.connect() as conn:
            if after:
                cursor = conn.execute(
                    select(t.c.seq).where(t.c.id == after, t.c.tenant == tenant)
                ).scalar()
                if cursor is None:
                    return [], False
                query = query.where(t.c.seq < cursor if order == "desc" else t.c.seq > cursor)
            query = query.order_by(t.c.seq.desc() if order == "desc" else t.c.seq.asc())
            rows = conn.execute(query.limit(limit + 1)).all()
        return [file_record(r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, tenant: str, file_id: str) -> FileRecord | None:
        """Remove ``tenant``'s file row, returning it (its blob is the caller's to remove)."""
        t = schema.files
        with self.engine.begin() as conn:
            row = conn.execute(select(t).where(t.c.id == file_id, t.c.tenant == tenant)).first()
            if row is None:
                return None
            conn.execute(t.delete().where(t.c.id == file_id))
        return file_record(row)

    def batch_validating_file(self, tenant: str, file_id: str) -> str | None:
        """The id of a batch still reading ``file_id`` (status validating), if any."""
        t = schema.batches
        with self.engine.connect() as conn:
            return conn.execute(
                select(t.c.id)
                .where(
                    t.c.tenant == tenant,
                    t.c.input_file_id == file_id,
                    t.c.status == BatchStatus.VALIDATING.value,
                )
                .limit(1)
            ).scalar()

    def all_blob_names(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(select(schema.files.c.blob)).scalars())
