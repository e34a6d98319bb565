"""What retrying a batch's failed requests reads and writes: which of an ended batch's rows
did not succeed (by line, or with their stored bodies), and the metadata a retry records on
the batch it made. Not on the polling path: plain statements over the requests' indexes."""

from __future__ import annotations

import orjson
from sqlalchemy import Engine, select, update

from batchd.store import schema
from batchd.store.records import RequestState

# The final states a retry takes again: everything but a success.
RETRIED_STATES = (RequestState.ERRORED, RequestState.EXPIRED, RequestState.CANCELED)


class RetryReadsMixin:
    engine: Engine

    def retry_line_numbers(self, batch_id: str) -> list[int]:
        """The 1-based input lines of the batch's rows that ended errored, expired or
        canceled, in input order."""
        r = schema.requests
        query = (
            select(r.c.line_no)
            .where(r.c.batch_id == batch_id, r.c.state.in_([s.value for s in RETRIED_STATES]))
            .order_by(r.c.line_no)
        )
        with self.engine.connect() as conn:
            return [int(n) for n in conn.execute(query).scalars()]

    def retry_requests(self, batch_id: str) -> list[tuple[str, bytes]]:
        """``(custom_id, stored body)`` of the same rows, in input order; a body is empty
        once retention archived the batch."""
        r = schema.requests
        query = (
            select(r.c.custom_id, r.c.body)
            .where(r.c.batch_id == batch_id, r.c.state.in_([s.value for s in RETRIED_STATES]))
            .order_by(r.c.line_no)
        )
        with self.engine.connect() as conn:
            return [(row.custom_id, bytes(row.body or b"")) for row in conn.execute(query)]

    def set_batch_metadata(self, batch_id: str, metadata: dict[str, str] | None) -> bool:
        """Replace the batch's metadata (None clears it); False for an unknown batch. For a
        create path that takes no metadata of its own (Anthropic's)."""
        b = schema.batches
        value = orjson.dumps(metadata).decode() if metadata is not None else None
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(b).where(b.c.id == batch_id).values(metadata=value)
            ).rowcount
        return bool(changed)
