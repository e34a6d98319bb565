"""Retention: expired files are deleted, and ended batches are archived once their time is up.

- A file past its ``expires_at`` (batch input files 30 days after upload, result files 30 days
  after they were written, or what the upload's ``expires_after`` or the batch's
  ``output_expires_after`` asked for) loses its row and its bytes, unless it is the input of
  a batch that has not ended: a running batch is never touched.
- An ended batch is archived ``batch_data_retention_seconds`` after it ended (OpenAI) or
  ``anthropic_results_retention_seconds`` after it was created (Anthropic keeps results 29
  days): its prompts and results are dropped from the rows, its counts stay, and an Anthropic
  batch shows ``archived_at`` and no longer serves results.
- Idempotency keys older than 24 hours are forgotten.
- Request rows that no batch owns and whose message batch id is over an hour old are deleted:
  a create killed between inserting its rows and its batch row left them; nothing reads them,
  but they would count in the queue-depth metrics forever.
- Blobs no row points at and older than a day are deleted: what a process killed between
  writing a file and committing its row left behind (a finalizer killed half-way, say) on a
  data dir other processes share, where start-up cannot tell an orphan from a write in flight.

``purge`` is one pass; ``run_forever`` repeats it in a worker thread at a fixed interval.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from batchd import ids
from batchd.blobs.base import BlobStore
from batchd.clock import now
from batchd.config import Settings
from batchd.service import idempotency
from batchd.store.store import Store

log = logging.getLogger(__name__)

# No write takes a day between its bytes and its row: an unreferenced blob older is an orphan.
ORPHAN_BLOB_GRACE_SECONDS = 24 * 3600
# Nor does a message batch create take an hour between its first row and its batch row.
ORPHAN_ROWS_GRACE_SECONDS = 3600


@dataclass(frozen=True, slots=True)
class PurgeReport:
    files_deleted: int
    batches_archived: int
    idempotency_keys_forgotten: int
    orphan_blobs_removed: int
    orphan_batches_dropped: int = 0


def purge(store: Store, blobs: BlobStore, settings: Settings, at: int | None = None) -> PurgeReport:
    at = now() if at is None else at
    files = 0
    while expired := store.expired_files(at):
        for record in expired:
            # Row first: a crash between the two leaves an orphan blob, which start-up
            # removes, never a row pointing at missing bytes.
            if store.remove_file(record.id):  # not if a batch took it up since
                blobs.delete(record.blob)
                files += 1
    archived = 0
    while batch_ids := store.batches_to_archive(
        at,
        openai_after_end=settings.batch_data_retention_seconds,
        anthropic_after_creation=settings.anthropic_results_retention_seconds,
    ):
        archived += sum(store.archive_batch(batch_id, at) for batch_id in batch_ids)
    keys = store.purge_idempotency_keys(at - idempotency.TTL_SECONDS)
    dropped = _drop_orphan_rows(store, at)
    store.prune_tenant_usage()  # fair share reads only the last minutes of it
    # Names first, then the directory: a blob committed in between is younger than the grace.
    referenced = store.all_blob_names()
    orphans = blobs.remove_orphans(referenced, older_than=at - ORPHAN_BLOB_GRACE_SECONDS)
    report = PurgeReport(files, archived, keys, orphans, dropped)
    if files or archived or keys or orphans or dropped:
        log.info(
            "retention pass: %d files deleted, %d batches archived, %d idempotency keys "
            "forgotten, %d orphan blobs removed, rows of %d unfinished creates dropped",
            files,
            archived,
            keys,
            orphans,
            dropped,
            extra={"action": "retention"},
        )
    return report


def _drop_orphan_rows(store: Store, at: int) -> int:
    dropped = 0
    for batch_id in store.orphan_request_batch_ids():
        created_ms = ids.message_batch_created_ms(batch_id)
        if created_ms is not None and created_ms // 1000 + ORPHAN_ROWS_GRACE_SECONDS <= at:
            store.delete_requests(batch_id)
            dropped += 1
    return dropped


async def run_forever(store: Store, blobs: BlobStore, settings: Settings) -> None:
    while True:
        try:
            await asyncio.to_thread(purge, store, blobs, settings)
        except Exception:  # a failed pass is retried at the next interval
            log.exception("retention pass failed")
        await asyncio.sleep(settings.retention_interval_seconds)
