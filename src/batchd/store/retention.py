"""What retention finds and removes: expired files, ended batches due for archiving, request
rows no batch owns, and idempotency keys past their time. Deciding when is the retention
service's; these are its queries."""

from __future__ import annotations

from sqlalchemy import Engine, Select, func, select, update

from batchd.store import schema
from batchd.store.files import file_record
from batchd.store.records import TERMINAL_BATCH_STATUSES, FileRecord

_TERMINAL = [s.value for s in TERMINAL_BATCH_STATUSES]


def _inputs_in_use() -> Select[tuple[str]]:
    """The input files of batches that have not ended: retention never removes them."""
    b = schema.batches
    return select(b.c.input_file_id).where(
        b.c.input_file_id.is_not(None), b.c.status.not_in(_TERMINAL)
    )


class RetentionMixin:
    engine: Engine

    def expired_files(self, at: int, limit: int = 500) -> list[FileRecord]:
        """Files past ``expires_at``, except the input file of a batch that has not ended."""
        f = schema.files
        in_use = _inputs_in_use()
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(f)
                .where(f.c.expires_at.is_not(None), f.c.expires_at <= at, f.c.id.not_in(in_use))
                .order_by(f.c.seq)
                .limit(limit)
            ).all()
        return [file_record(r) for r in rows]

    def remove_file(self, file_id: str) -> bool:
        """Remove a file row whatever its tenant (its blob is the caller's to remove), unless
        a batch that has not ended reads it (one checked since ``expired_files`` ran); returns
        whether it was removed."""
        f = schema.files
        with self.engine.begin() as conn:
            removed = conn.execute(
                f.delete().where(f.c.id == file_id, f.c.id.not_in(_inputs_in_use()))
            ).rowcount
        return bool(removed)

    def batches_to_archive(
        self, at: int, *, openai_after_end: int, anthropic_after_creation: int, limit: int = 100
    ) -> list[str]:
        """Ended, not yet archived batches whose retention has run out: OpenAI's a while after
        they ended, Anthropic's a while after creation (its results live 29 days)."""
        b = schema.batches
        ended = func.coalesce(b.c.completed_at, b.c.failed_at, b.c.expired_at, b.c.cancelled_at)
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(b.c.id)
                    .where(
                        b.c.status.in_(_TERMINAL),
                        b.c.archived_at.is_(None),
                        ((b.c.surface == "openai") & (ended + openai_after_end <= at))
                        | (
                            (b.c.surface == "anthropic")
                            & (b.c.created_at + anthropic_after_creation <= at)
                        ),
                    )
                    .order_by(b.c.seq)
                    .limit(limit)
                ).scalars()
            )

    def archive_batch(self, batch_id: str, at: int) -> bool:
        """Drop the prompts and results of an ended batch, keeping each row's state (the
        counts are derived from it). Only an ended batch: the status is checked in the same
        transaction."""
        b, r = schema.batches, schema.requests
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(b)
                .where(b.c.id == batch_id, b.c.status.in_(_TERMINAL), b.c.archived_at.is_(None))
                .values(archived_at=at)
            ).rowcount
            if changed:
                conn.execute(
                    update(r).where(r.c.batch_id == batch_id).values(body=b"", result=None)
                )
        return bool(changed)

    def orphan_request_batch_ids(self, limit: int = 100) -> list[str]:
        """Batch ids that request rows name but no batch row has: what a message batch create
        killed between inserting its rows and its batch row left behind (or one running now)."""
        r, b = schema.requests, schema.batches
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(r.c.batch_id)
                    .where(~select(b.c.id).where(b.c.id == r.c.batch_id).exists())
                    .distinct()
                    .limit(limit)
                ).scalars()
            )

    def purge_idempotency_keys(self, older_than: int) -> int:
        """Forget the keys recorded before ``older_than``; returns how many."""
        t = schema.idempotency_keys
        with self.engine.begin() as conn:
            return int(conn.execute(t.delete().where(t.c.created_at < older_than)).rowcount)
