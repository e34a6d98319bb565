"""The scheduler: validates new batches, leases request rows, runs them on the engine,
commits each result, enforces cancel and expiry, and finalizes finished batches.

One instance per worker process. In ``batchd serve`` it owns the data dir (a file lock), so
at start it can return every ``running`` row to ``pending``: whoever ran them is dead.
Results are committed only under the lease (owner + epoch), see ``Store.complete``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

from batchd.blobs import BlobStore
from batchd.config import Settings
from batchd.engines.base import Engine
from batchd.scheduler.execute import execute
from batchd.scheduler.finalize import finalize_batch
from batchd.scheduler.validation import validate_batch
from batchd.store.records import (
    BatchStatus,
    LeasedRequest,
    RequestOutcome,
    RequestState,
)
from batchd.store.store import Store, now

log = logging.getLogger(__name__)

# Lease more only when at least this share of the engine's capacity is free: claiming in
# slices keeps the database off the hot path.
LEASE_SLICE_FRACTION = 4


def _lower_thread_priority(nice: int) -> None:
    """Runs in each background worker thread: on Linux a thread has its own nice value, so
    bulk validation and result-file writing yield the cores to the engine's decode loop
    (one busy Python thread beside a 2-thread engine cut generation to a third, measured)."""
    if nice > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except (OSError, AttributeError):  # not permitted, or not Linux: run un-niced
            log.debug("could not lower the background thread's priority")


class Scheduler:
    def __init__(self, store: Store, blobs: BlobStore, engine: Engine, settings: Settings) -> None:
        self.store = store
        self.blobs = blobs
        self.engine = engine
        self.settings = settings
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._wake = asyncio.Event()
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._inflight_by_batch: dict[str, set[int]] = {}
        self._validating: set[str] = set()
        self._background: set[asyncio.Task[object]] = set()
        self._stopping = False
        # Bulk work (validating uploads, writing result files) runs here, niced, off the loop.
        self._bulk = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="batchd-bulk",
            initializer=_lower_thread_priority,
            initargs=(settings.background_nice,),
        )

    # ------------------------------------------------------------ lifecycle

    async def recover(self) -> None:
        """Crash recovery at start: requeue orphaned running rows, drop orphan blobs."""
        requeued = await asyncio.to_thread(self.store.requeue_running)
        referenced = await asyncio.to_thread(self.store.all_blob_names)
        removed = await asyncio.to_thread(self.blobs.remove_orphans, referenced)
        if requeued or removed:
            log.warning(
                "recovered after an unclean stop: %s request(s) requeued, %s orphan blob(s) removed",
                requeued,
                removed,
                extra={"action": "recovered", "requeued": requeued, "orphans": removed},
            )

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        renew_every = max(1.0, self.settings.lease_seconds / 3)
        last_renew = asyncio.get_running_loop().time()
        while not self._stopping:
            try:
                await self._tick()
                loop_time = asyncio.get_running_loop().time()
                if self._inflight and loop_time - last_renew >= renew_every:
                    await asyncio.to_thread(
                        self.store.renew_leases, self.owner, self.settings.lease_seconds
                    )
                    last_renew = loop_time
            except Exception:
                log.exception("scheduler tick failed", extra={"action": "tick_failed"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval_seconds)
            self._wake.clear()

    async def stop(self) -> None:
        """Stop without writing anything for unfinished work: those rows stay ``running``
        and are requeued by the next start (or by lease expiry)."""
        self._stopping = True
        self._wake.set()
        tasks = list(self._inflight.values()) + list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._bulk.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ tick

    async def _tick(self) -> None:
        await self._start_validations()
        await self._expire_overdue()
        await self._end_cancelling()
        await self._fill_engine()
        await self._finalize_ready()

    async def _start_validations(self) -> None:
        ids = await asyncio.to_thread(self.store.batch_ids_with_status, BatchStatus.VALIDATING)
        for batch_id in ids:
            if batch_id not in self._validating:
                self._validating.add(batch_id)
                self._spawn(self._validate(batch_id))

    async def _validate(self, batch_id: str) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._bulk, validate_batch, self.store, self.blobs, self.settings, batch_id
            )
        except Exception:
            log.exception("validation crashed", extra={"action": "validation_crashed"})
        finally:
            self._validating.discard(batch_id)
            self.wake()

    async def _expire_overdue(self) -> None:
        for batch_id in await asyncio.to_thread(self.store.overdue_batch_ids, now()):
            if batch_id in self._validating:
                continue
            batch = await asyncio.to_thread(self.store.get_batch, batch_id)
            if batch is None:
                continue
            if batch.status == BatchStatus.VALIDATING:
                # Nothing ran: still an expiry, with every row (none yet) unexecuted.
                await asyncio.to_thread(
                    self.store.transition,
                    batch_id,
                    [BatchStatus.VALIDATING],
                    BatchStatus.EXPIRED,
                )
                continue
            await self._stop_batch(batch_id, RequestState.EXPIRED)
            log.info("batch expired", extra={"action": "batch_expired", "batch_id": batch_id})

    async def _end_cancelling(self) -> None:
        ids = await asyncio.to_thread(self.store.batch_ids_with_status, BatchStatus.CANCELLING)
        for batch_id in ids:
            if batch_id not in self._validating:
                await self._stop_batch(batch_id, RequestState.CANCELED)

    async def _stop_batch(self, batch_id: str, state: RequestState) -> None:
        """End a batch's unfinished rows as ``state``; finished results are kept."""
        await asyncio.to_thread(self.store.end_pending, batch_id, state)
        seqs = list(self._inflight_by_batch.get(batch_id, ()))
        tasks = [self._inflight[s] for s in seqs if s in self._inflight]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # Rows whose task was stopped before it could commit are still running under our lease.
        await asyncio.to_thread(self.store.end_running, batch_id, state)

    async def _fill_engine(self) -> None:
        capacity = self.engine.capacity()
        free = capacity - len(self._inflight)
        if free <= 0 or (self._inflight and free < max(1, capacity // LEASE_SLICE_FRACTION)):
            return
        leased = await asyncio.to_thread(
            self.store.lease, self.owner, free, self.settings.lease_seconds
        )
        for item in leased:
            task = asyncio.create_task(self._execute(item))
            self._inflight[item.seq] = task
            self._inflight_by_batch.setdefault(item.batch_id, set()).add(item.seq)

    async def _finalize_ready(self) -> None:
        ids = await asyncio.to_thread(
            self.store.batch_ids_with_status,
            BatchStatus.IN_PROGRESS,
            BatchStatus.CANCELLING,
            BatchStatus.FINALIZING,
        )
        for batch_id in ids:
            if self._inflight_by_batch.get(batch_id) or batch_id in self._validating:
                continue
            if await asyncio.to_thread(self.store.has_unfinished, batch_id):
                continue  # queued work left: not ready, and no need to count its rows
            await asyncio.get_running_loop().run_in_executor(
                self._bulk, finalize_batch, self.store, self.blobs, batch_id
            )

    # -------------------------------------------------------------- requests

    async def _execute(self, item: LeasedRequest) -> None:
        try:
            outcome = await self._run_request(item)
            committed = await asyncio.to_thread(self.store.complete, item, self.owner, outcome)
            if not committed:
                log.warning(
                    "result not committed: lease lost",
                    extra={"action": "lease_lost", "batch_id": item.batch_id, "line": item.line_no},
                )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request crashed", extra={"action": "request_crashed"})
        finally:
            self._inflight.pop(item.seq, None)
            members = self._inflight_by_batch.get(item.batch_id)
            if members is not None:
                members.discard(item.seq)
                if not members:
                    del self._inflight_by_batch[item.batch_id]
            self.wake()

    async def _run_request(self, item: LeasedRequest) -> RequestOutcome:
        return await execute(self.engine, item.endpoint, item.body)

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[object] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)
