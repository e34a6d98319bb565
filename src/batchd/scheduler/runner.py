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
import time
from concurrent.futures import ThreadPoolExecutor

from batchd import metrics
from batchd.blobs.base import BlobStore
from batchd.clock import now
from batchd.config import Settings
from batchd.engines.base import Engine, RetryLater
from batchd.inference.executors.base import RunContext
from batchd.inference.executors.registry import execute
from batchd.scheduler.completions import CompletionWriter
from batchd.scheduler.finalize import finalize_batch
from batchd.scheduler.validation import validate_batch
from batchd.store.records import (
    BatchStatus,
    LeasedRequest,
    RequestOutcome,
    RequestState,
)
from batchd.store.store import Store

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
        self._completions = CompletionWriter(store.complete_many, self.owner)
        self._wake = asyncio.Event()
        # A finished request only needs its slot refilled (and, if it was its batch's last
        # one here, the batch looked at); the full tick (validations, expiry, cancels, every
        # batch's finalizing) runs when asked for and at least every poll interval. Running it
        # on every finished request cost a handful of queries per request.
        self._full_tick_due = True
        self._finalize_candidates: set[str] = set()
        self._inflight: dict[int, asyncio.Task[None]] = {}
        # The lease of each in-flight row whose task is still working on it (a row leaves
        # this map when its task starts committing): what the heartbeat checks for loss.
        self._working: dict[int, LeasedRequest] = {}
        self._inflight_by_batch: dict[str, set[int]] = {}
        self._validating: set[str] = set()
        self._background: set[asyncio.Task[object]] = set()
        self._stopping = False
        self._leased_last_tick = 0  # rows the last lease query claimed (for --drain)
        # Bulk work (validating uploads, writing result files) runs here, niced, off the loop.
        self._bulk = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="batchd-bulk",
            initializer=_lower_thread_priority,
            initargs=(settings.background_nice,),
        )

    # ------------------------------------------------------------ lifecycle

    @property
    def exclusive(self) -> bool:
        """The only worker on its database: SQLite in a locked data dir. A shared database
        (PostgreSQL) may have other workers whose running rows and unreferenced upload blobs
        are alive, not orphans."""
        return self.store.engine.dialect.name == "sqlite"

    async def recover(self) -> None:
        """Crash recovery at start. The sole worker requeues every running row (whoever ran
        them is dead) and drops orphan blobs; one of many requeues only rows whose lease
        lapsed (as the periodic sweep does)."""
        if not self.exclusive:
            await self._sweep_lapsed_leases()
            return
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

    async def _sweep_lapsed_leases(self) -> int:
        requeued = await asyncio.to_thread(self.store.requeue_running, lapsed_before=now())
        if requeued:
            metrics.LEASES_REQUEUED.inc(requeued)
            log.warning(
                "requeued %s request(s) whose lease lapsed",
                requeued,
                extra={"action": "lapsed_leases_requeued", "requeued": requeued},
            )
        return requeued

    def leases_held(self) -> int:
        return len(self._inflight)

    def wake(self) -> None:
        """Run a full tick now (new batch, cancel, requeued rows)."""
        self._full_tick_due = True
        self._wake.set()

    def _nudge(self) -> None:
        """A request ended: refill the engine (a light tick)."""
        self._wake.set()

    @property
    def _renew_every(self) -> float:
        return max(1.0, self.settings.lease_seconds / 3)

    def idle(self) -> bool:
        """Nothing held, nothing being validated, and the last lease query found nothing
        this worker could run."""
        return not self._inflight and not self._validating and self._leased_last_tick == 0

    async def run(self, *, drain: bool = False) -> None:
        """Schedule until stopped; with ``drain``, return once the queue holds nothing this
        worker can run and its own leases are finished."""
        keeper = asyncio.create_task(self._keep_leases())
        try:
            await self._schedule(drain)
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)

    async def _schedule(self, drain: bool) -> None:
        last_full = asyncio.get_running_loop().time()
        while not self._stopping:
            try:
                loop_time = asyncio.get_running_loop().time()
                if (
                    self._full_tick_due
                    or loop_time - last_full >= self.settings.poll_interval_seconds
                ):
                    self._full_tick_due = False
                    last_full = loop_time
                    self._finalize_candidates.clear()  # the full tick looks at every batch
                    await self._tick()
                else:
                    await self._light_tick()
                if drain and self.idle():
                    # One more look after results and finalizing settled, then done.
                    await self._tick()
                    if self.idle():
                        log.info(
                            "drained: no work left for this worker",
                            extra={"action": "worker_drained"},
                        )
                        return
            except Exception:
                log.exception("scheduler tick failed", extra={"action": "tick_failed"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval_seconds)
            self._wake.clear()

    async def _keep_leases(self) -> None:
        """The heartbeat and the sweeper, on a timer of their own: a long finalize or
        validation on the scheduling loop must not let this worker's leases lapse.

        Heartbeat: renew every lease we hold; if fewer rows are still ours than we are
        working on, the lost ones (we stalled past the lease, and another worker or a cancel
        took them) are stopped at once instead of running on to a refused commit. Sweeper:
        rows of a worker that died, or stalled past its lease, go back to the queue; fencing
        (owner + epoch) stops a stalled one from writing when it wakes."""
        renew_every = self._renew_every
        sweep_every = max(1.0, self.settings.lease_seconds / 2)
        last_sweep = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(renew_every)
            try:
                if self._working:
                    await self._renew_leases()
                if asyncio.get_running_loop().time() - last_sweep >= sweep_every:
                    last_sweep = asyncio.get_running_loop().time()
                    if await self._sweep_lapsed_leases():
                        self.wake()
            except Exception:
                log.exception("lease heartbeat failed", extra={"action": "heartbeat_failed"})

    async def _renew_leases(self) -> None:
        working = len(self._working)
        held = await asyncio.to_thread(
            self.store.renew_leases, self.owner, self.settings.lease_seconds
        )
        if held >= working:
            return
        still_ours = await asyncio.to_thread(self.store.held_leases, self.owner)
        lost = [
            seq
            for seq, leased in list(self._working.items())
            if (seq, leased.epoch) not in still_ours
        ]
        for seq in lost:
            self._working.pop(seq, None)
            task = self._inflight.get(seq)
            if task is not None:
                task.cancel()
        if lost:
            metrics.LEASES_LOST.inc(len(lost))
            log.warning(
                "lost the lease of %s request(s) (stalled past it?): stopped them",
                len(lost),
                extra={"action": "leases_lost", "lost": len(lost)},
            )

    async def stop(self, grace_seconds: float = 0.0) -> None:
        """Stop leasing; give the requests in hand up to ``grace_seconds`` to finish and
        commit (their leases renewed meanwhile); hand whatever is left back to the queue."""
        self._stopping = True
        self._wake.set()
        finished_in_grace = await self._finish_inflight(grace_seconds)
        if finished_in_grace:
            log.info(
                "finished %s request(s) in hand before stopping",
                finished_in_grace,
                extra={"action": "stop_finished_inflight", "finished": finished_in_grace},
            )
        tasks = list(self._inflight.values()) + list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._bulk.shutdown(wait=False, cancel_futures=True)
        # Our unfinished rows go straight back to the queue for the other workers (their
        # partial work is discarded; each request is answered once, by whoever finishes it).
        released = await asyncio.to_thread(self.store.release_owned, self.owner)
        if released:
            metrics.LEASES_RELEASED.inc(released)
            log.info(
                "released %s unfinished request(s) on stop",
                released,
                extra={"action": "leases_released", "released": released},
            )

    async def _finish_inflight(self, grace_seconds: float) -> int:
        """Wait up to ``grace_seconds`` for the in-flight requests, renewing their leases so
        that no other worker takes them over meanwhile. Returns how many finished."""
        pending = set(self._inflight.values())
        total = len(pending)
        deadline = time.monotonic() + grace_seconds
        while pending and time.monotonic() < deadline:
            timeout = min(self._renew_every, deadline - time.monotonic())
            _, pending = await asyncio.wait(pending, timeout=max(0.0, timeout))
            if pending:
                await asyncio.to_thread(
                    self.store.renew_leases, self.owner, self.settings.lease_seconds
                )
        return total - len(pending)

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
                self._bulk,
                validate_batch,
                self.store,
                self.blobs,
                self.settings,
                batch_id,
                self.owner,
                self.engine.resolve_model,
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
        # Rows whose task was stopped before it could commit are still running under our
        # lease. Other workers' rows of the batch are theirs to stop, at their next tick.
        await asyncio.to_thread(self.store.end_running, batch_id, state, self.owner)

    async def _fill_engine(self) -> None:
        capacity = self.engine.capacity()
        free = capacity - len(self._inflight)
        if free <= 0 or (self._inflight and free < max(1, capacity // LEASE_SLICE_FRACTION)):
            return
        # Rows of a model whose engine is full or whose upstream is down stay queued, so they
        # cannot take every slot from other models' batches.
        skip = self.engine.unavailable_models()
        leased = await asyncio.to_thread(
            self.store.lease,
            self.owner,
            free,
            self.settings.lease_seconds,
            skip,
            self.settings.fair_share_window_seconds,
        )
        self._leased_last_tick = len(leased)
        if leased:
            metrics.LEASES_CLAIMED.inc(len(leased))
            metrics.LEASE_SLICES.inc()
        for item in leased:
            stale = self._inflight.get(item.seq)
            if stale is not None:
                # Our own older lease of this row lapsed and it came back to us: that task's
                # commit would be refused (its epoch is old), so stop it.
                stale.cancel()
            task = asyncio.create_task(self._execute(item))
            self._inflight[item.seq] = task
            self._working[item.seq] = item
            self._inflight_by_batch.setdefault(item.batch_id, set()).add(item.seq)

    async def _light_tick(self) -> None:
        await self._fill_engine()
        if self._finalize_candidates:
            candidates, self._finalize_candidates = self._finalize_candidates, set()
            await self._finalize_ready(sorted(candidates))

    async def _finalize_ready(self, candidates: list[str] | None = None) -> None:
        """Finalize the batches with nothing left to run: ``candidates``, or every batch
        that is in progress, cancelling or finalizing."""
        ids = candidates
        if ids is None:
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
            status = await asyncio.get_running_loop().run_in_executor(
                self._bulk,
                finalize_batch,
                self.store,
                self.blobs,
                batch_id,
                self.settings.file_retention_seconds,
            )
            if status is not None:
                metrics.BATCHES_FINALIZED.labels(status.value).inc()

    # -------------------------------------------------------------- requests

    async def _execute(self, item: LeasedRequest) -> None:
        started = time.monotonic()
        try:
            try:
                outcome = await self._run_request(item)
            except RetryLater as later:
                self._done_working(item)
                metrics.LEASES_RELEASED.inc()
                # The upstream keeps failing but the deadline allows more: give the slot back
                # and queue the row again (leasing skips the model while its upstream is
                # blocked); expiry ends it if the deadline passes first.
                await asyncio.to_thread(self.store.release, item, self.owner, later.attempts)
                log.info(
                    "request released for a later try: %s",
                    later.reason,
                    extra={
                        "action": "request_released",
                        "batch_id": item.batch_id,
                        "line": item.line_no,
                        "attempts": later.attempts,
                    },
                )
                return
            self._done_working(item)  # from here a lost lease costs nothing: the fence decides
            committed = await self._completions.complete(item, outcome)
            if committed:
                metrics.REQUESTS_FINISHED.labels(item.endpoint, outcome.state.value).inc()
                metrics.REQUEST_SECONDS.labels(item.endpoint).observe(time.monotonic() - started)
            else:
                metrics.LEASES_LOST.inc()
                log.warning(
                    "result not committed: lease lost",
                    extra={"action": "lease_lost", "batch_id": item.batch_id, "line": item.line_no},
                )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request crashed", extra={"action": "request_crashed"})
        finally:
            # Unless a newer lease of the same row (see _fill_engine) runs in a task of its own.
            if self._inflight.get(item.seq) is asyncio.current_task():
                del self._inflight[item.seq]
                self._done_working(item)
                members = self._inflight_by_batch.get(item.batch_id)
                if members is not None:
                    members.discard(item.seq)
                    if not members:
                        del self._inflight_by_batch[item.batch_id]
                        self._finalize_candidates.add(item.batch_id)
            self._nudge()

    def _done_working(self, item: LeasedRequest) -> None:
        if self._working.get(item.seq) is item:  # not a newer lease of the same row
            del self._working[item.seq]

    async def _run_request(self, item: LeasedRequest) -> RequestOutcome:
        context = RunContext(
            deadline=float(item.expires_at) if item.expires_at is not None else None,
            prior_attempts=item.upstream_attempts,
        )
        return await execute(self.engine, item.endpoint, item.body, context)

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[object] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)
