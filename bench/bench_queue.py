"""The queue alone: lease -> result -> finalize through the Store, no HTTP and no engine.

What one request costs the database path itself, on SQLite and on PostgreSQL, with the claim
slice (rows per lease query) at 1, 8 and 64, and with 1 or 4 worker processes claiming from
the same batch at once (each its own process and connection pool, like ``batchd worker``).
A row's "work" is nothing: each claimed row is committed as succeeded at once, so the figure
is the coordination cost a real engine's time would hide behind. Then the lease query's own
latency with a deep backlog (100,000 pending rows of 20 batches), since it orders the queue by
deadline and prefix.

    .venv/bin/python bench/bench_queue.py                      # both databases, appends to RESULTS.md
    .venv/bin/python bench/bench_queue.py --n 2000 --no-record

PostgreSQL is the one at BATCHD_TEST_POSTGRES_URL (default: the local one); its part is
skipped with a message where none answers.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.synchronize
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import append_record
from bench.bench_scale import fresh_database, postgres_unreachable

from batchd.blobs.local import DirectoryBlobStore
from batchd.clock import now
from batchd.protocol.batch_file import RequestLine
from batchd.scheduler.finalize import finalize_batch
from batchd.store import database
from batchd.store.records import BatchStatus, RequestOutcome, RequestState
from batchd.store.store import Store

BODY = b'{"model":"default","messages":[{"role":"user","content":"Say hi."}],"max_tokens":8}'
RESULT = b'{"id":"chatcmpl-x","object":"chat.completion","choices":[],"usage":{}}'


def open_store(url: str) -> Store:
    engine = database.open_url(url, pool_size=2, max_overflow=2)
    return Store(engine)


def add_batch(store: Store, batch_id: str, rows: int, expires_in: int = 3600) -> None:
    store.create_batch(
        {
            "id": batch_id,
            "tenant": "bench",
            "surface": "openai",
            "endpoint": "/v1/chat/completions",
            "input_file_id": "file-bench",
            "completion_window": "24h",
            "status": BatchStatus.VALIDATING.value,
            "created_at": now(),
            "expires_at": now() + expires_in,
        }
    )
    chunk = 5000
    for start in range(0, rows, chunk):
        lines = [
            RequestLine(i + 1, f"r{i}", BODY, "default", f"p{i % 8}")
            for i in range(start, min(rows, start + chunk))
        ]
        store.insert_requests(batch_id, lines)
    assert store.transition(batch_id, [BatchStatus.VALIDATING], BatchStatus.IN_PROGRESS)


def drain(
    url: str,
    owner: str,
    slice_size: int,
    barrier: multiprocessing.synchronize.Barrier,
    results: multiprocessing.Queue[int],
) -> None:
    """One worker process: claim slices and commit each row until the queue is empty."""
    store = open_store(url)
    outcome = RequestOutcome(RequestState.SUCCEEDED, 200, RESULT, 10, 8, 0)
    done = 0
    barrier.wait()
    while leased := store.lease(owner, slice_size, 60):
        for item in leased:
            done += int(store.complete(item, owner, outcome))
    store.engine.dispose()
    results.put(done)


def run_queue(url: str, n: int, slice_size: int, workers: int) -> tuple[float, int]:
    """Seconds from the first claim to the finalized batch; requests committed."""
    store = open_store(url)
    add_batch(store, "batch_bench", n)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers + 1)
    results: multiprocessing.Queue[int] = ctx.Queue()
    procs = [
        ctx.Process(target=drain, args=(url, f"w{k}", slice_size, barrier, results))
        for k in range(workers)
    ]
    for proc in procs:
        proc.start()
    barrier.wait()  # every worker connected and ready: start the clock
    started = time.perf_counter()
    committed = sum(results.get(timeout=600) for _ in procs)
    with tempfile.TemporaryDirectory() as tmp:
        status = finalize_batch(store, DirectoryBlobStore(Path(tmp)), "batch_bench")
    seconds = time.perf_counter() - started
    for proc in procs:
        proc.join()
    assert status == BatchStatus.COMPLETED, status
    store.engine.dispose()
    return seconds, committed


def sqlite_url(tmp: str, name: str) -> str:
    return f"sqlite+pysqlite:///{tmp}/{name}.sqlite3"


def migrated(url: str) -> str:
    engine = database.open_url(url)
    database.upgrade(engine)
    engine.dispose()
    return url


def lease_latency(url: str, backlog: int, batches: int, slice_size: int, samples: int) -> float:
    """Median ms of one lease query of ``slice_size`` rows with ``backlog`` rows pending."""
    store = open_store(url)
    per = backlog // batches
    for b in range(batches):
        add_batch(store, f"batch_deep_{b}", per, expires_in=3600 + b)
    times = []
    for k in range(samples):
        started = time.perf_counter()
        leased = store.lease(f"probe{k}", slice_size, 60)
        times.append((time.perf_counter() - started) * 1000)
        assert len(leased) == slice_size
    store.engine.dispose()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="requests in the batch")
    parser.add_argument("--slices", default="1,8,64")
    parser.add_argument("--workers", default="1,4")
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    slices = [int(x) for x in args.slices.split(",")]
    worker_counts = [int(x) for x in args.workers.split(",")]

    report = [
        f"queue alone: one batch of {args.n} requests, lease -> commit result -> finalize through"
        " the Store (no HTTP, no engine: each claimed row is committed at once)"
    ]
    print(report[0], flush=True)
    backends: list[tuple[str, object]] = [("SQLite", None)]
    why_not = postgres_unreachable()
    if why_not is None:
        backends.append(("PostgreSQL", fresh_database))
    else:
        report.append(f"   PostgreSQL skipped: not reachable ({why_not})")
        print(report[-1], flush=True)
    with tempfile.TemporaryDirectory(prefix="batchd-bench-queue-") as tmp:
        for name, fresh in backends:
            for workers in worker_counts:
                for slice_size in slices:
                    if name == "SQLite":
                        url = migrated(sqlite_url(tmp, f"q{workers}_{slice_size}"))
                        seconds, committed = run_queue(url, args.n, slice_size, workers)
                    else:
                        with fresh() as url:  # type: ignore[operator]
                            seconds, committed = run_queue(
                                migrated(url), args.n, slice_size, workers
                            )
                    assert committed == args.n, (committed, args.n)
                    line = (
                        f"   {name:<10} workers {workers}, slice {slice_size:>3}: "
                        f"{args.n / seconds:7.0f} req/s, {seconds / args.n * 1000:.3f} ms/request"
                    )
                    report.append(line)
                    print(line, flush=True)
            if name == "SQLite":
                url = migrated(sqlite_url(tmp, "deep"))
                ms = lease_latency(url, args.backlog, 20, 64, 20)
            else:
                with fresh() as url:  # type: ignore[operator]
                    ms = lease_latency(migrated(url), args.backlog, 20, 64, 20)
            line = (
                f"   {name:<10} one lease query of 64 rows with {args.backlog} pending in 20"
                f" batches: {ms:.1f} ms (median of 20)"
            )
            report.append(line)
            print(line, flush=True)
    if not args.no_record:
        append_record(
            "python bench/bench_queue.py " + " ".join(sys.argv[1:]),
            report,
            title="queue alone",
        )


if __name__ == "__main__":
    main()
