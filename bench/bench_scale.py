"""Scale-out: what the queue costs per request on SQLite vs PostgreSQL, and what K worker
processes on one PostgreSQL database buy, measured side by side in one run.

Every figure is one batch of --n chat requests driven with the official ``openai`` SDK over
real HTTP, timed from the start of the JSONL upload to the downloaded output file (upload ->
batch create -> validation -> lease -> result -> finalize -> output file):

1. queue overhead with a near-instant engine: ``batchd serve`` on SQLite (temp data dir) vs
   ``batchd serve --database-url postgresql+psycopg://...`` (a fresh database), one process
   each; per-request overhead in ms and the ratio PostgreSQL/SQLite;
2. ``batchd api`` + K ``batchd worker`` processes (--workers, default 1,2,4) on a fresh
   PostgreSQL database per arm, with
   a. the near-instant engine: bounded by the database and this machine's CPU (API, workers,
      PostgreSQL and this client share its cores), and
   b. a SIMULATED engine: each worker owns a fixed number of sequences that each take 10 ms
      per token (as an accelerator would), so the ceiling grows with K and the speed-up shows
      whether the queue keeps K engines fed.

The engine is ``BATCHD_ENGINE=fake`` (src/batchd/engines/fake.py), an echo engine that sleeps
``step_seconds`` per token (``BATCHD_FAKE_STEP_SECONDS``, default 10 ms, which this benchmark
keeps so its records stay comparable) and admits 2 x ``BATCHD_MAX_SEQS`` requests at once. So:

- "near-instant" = max_tokens 1 (one 10 ms step per request) with --instant-max-seqs 64
  (128 requests in flight per process): the engine's own ceiling is ~12,800 requests/s per
  process, far above what the queue delivers, so the queue is what is measured;
- "simulated" = max_tokens --sim-tokens (default 16; the echoed prompt has >= 19 words, so
  every request yields exactly that many tokens) with --sim-max-seqs (default 4, i.e. 8 in
  flight per worker): a ceiling of 8 / (16 x 10 ms) = 50 requests/s = 800 tokens/s per worker.

Each arm first runs a small warm-up batch, then the measured one. The PostgreSQL arms are
skipped, with a message, if the server named by BATCHD_TEST_POSTGRES_URL (default: the local
one, trust auth, as tests/support/pg.py) is unreachable. Every process is stopped and every database
dropped at the end.

    .venv/bin/python bench/bench_scale.py [--n 5000] [--workers 1,2,4] [--sim-tokens 16]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from _harness import append_record, free_port, machine, run_batch, small_chat_workload

ADMIN_URL = os.environ.get(
    "BATCHD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
STEP_SECONDS = 0.01  # the fake engine's per-token sleep, fixed in engines/factory.py
STARTUP_TIMEOUT_SECONDS = 120
WARMUP_REQUESTS = 100
PROBLEM_MARKS = (" ERROR ", " WARNING ", " CRITICAL ", "Traceback")


# ------------------------------------------------------------------ CPU accounting (Linux)


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu() -> float:
    """CPU seconds of every process named ``postgres`` (the server and its backends; a backend
    that exits between two readings takes its share with it)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "postgres":
                    total += process_cpu(int(entry.name))
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return float(sum(values) - idle), float(sum(values))


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """One ``batchd`` subprocess, its output in a log file."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "batchd.cli", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"batchd {self.args[0]} exited early:\n{self.log()}")

    def wait_healthy(self, url: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while True:
            self.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"batchd {self.args[0]} did not become healthy:\n{self.log()}")
            time.sleep(0.2)

    def wait_for_log(self, needle: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while needle not in self.log():
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {needle!r} from batchd {self.args[0]}:\n{self.log()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def base_env(max_seqs: int) -> dict[str, str]:
    """This environment without any BATCHD_* variable of the caller's, plus the fake engine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
    env.update(BATCHD_ENGINE="fake", BATCHD_MAX_SEQS=str(max_seqs))
    return env


@dataclass
class Deployment:
    url: str  # the HTTP API
    procs: list[Proc] = field(default_factory=list)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="bench", max_retries=0, timeout=600)


@contextlib.contextmanager
def deployment(
    tmp: Path, max_seqs: int, database_url: str | None, workers: int
) -> Iterator[Deployment]:
    """workers == 0: one ``batchd serve`` (SQLite in ``tmp`` unless a database URL is given);
    otherwise one ``batchd api`` and ``workers`` ``batchd worker`` processes, sharing the
    database and the data dir ``tmp``. Every process is stopped on the way out."""
    env = base_env(max_seqs)
    port = free_port()
    shared = ["--data-dir", str(tmp)] + (["--database-url", database_url] if database_url else [])
    procs: list[Proc] = []
    try:
        if workers == 0:
            front = Proc(["serve", "--port", str(port), *shared], env, tmp / "serve.log")
            procs.append(front.start())
        else:
            for index in range(workers):
                procs.append(Proc(["worker", *shared], env, tmp / f"worker{index}.log").start())
            front = Proc(["api", "--port", str(port), *shared], env, tmp / "api.log")
            procs.append(front.start())
            for proc in procs[:-1]:
                proc.wait_for_log("running")
        url = f"http://127.0.0.1:{port}"
        front.wait_healthy(url)
        yield Deployment(url=url, procs=procs)
    finally:
        for proc in procs:
            proc.stop()


# ---------------------------------------------------------------------------- database


def postgres_unreachable() -> str | None:
    """None if the admin URL answers, else why not."""
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
        return None
    except OperationalError as exc:
        return str(exc.orig).strip().splitlines()[0]
    finally:
        admin.dispose()


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty database on the admin server, dropped (connections and all) at the end."""
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"batchd_bench_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


# ----------------------------------------------------------------------------- measuring


@dataclass
class Measured:
    requests: int
    tokens: int
    seconds: float
    front_cpu: float  # core-seconds, the `batchd serve` or `batchd api` process
    workers_cpu: float  # core-seconds, every `batchd worker` process
    postgres_cpu: float  # core-seconds, every postgres process on this machine
    machine_busy: float  # cores busy on average over the batch (all processes)
    problems: list[str]  # ERROR/WARNING/Traceback lines the batchd processes logged

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds

    @property
    def ms_per_request(self) -> float:
        return self.seconds / self.requests * 1000

    def cpu_note(self, with_postgres: bool) -> str:
        per = 1000 / self.requests
        if self.workers_cpu:
            note = (
                f"CPU ms/request: api {self.front_cpu * per:.2f}, workers"
                f" {self.workers_cpu * per:.2f}"
            )
        else:
            note = f"CPU ms/request: serve {self.front_cpu * per:.2f}"
        if with_postgres:
            note += f", postgres {self.postgres_cpu * per:.2f}"
        return note + f"; machine {self.machine_busy:.2f} of {os.cpu_count()} cores busy"


def measure(
    tmp: Path,
    bodies: list[dict[str, Any]],
    *,
    max_seqs: int,
    database_url: str | None,
    workers: int,
) -> Measured:
    """Start the deployment, run a warm-up batch, then the measured one."""
    with deployment(tmp, max_seqs, database_url, workers) as dep:
        client = dep.client()
        run_batch(client, bodies[:WARMUP_REQUESTS])
        front, *rest = sorted(dep.procs, key=lambda p: p.args[0] == "worker")

        def cpu() -> tuple[float, float, float, tuple[float, float]]:
            workers = sum(process_cpu(p.pid) for p in rest)
            return process_cpu(front.pid), workers, postgres_cpu(), machine_busy()

        before = cpu()
        result = run_batch(client, bodies)
        after = cpu()
    problems = [
        f"{p.args[0]}: {line.strip()[:200]}"
        for p in dep.procs
        for line in p.log_path.read_text(errors="replace").splitlines()
        if any(mark in line for mark in PROBLEM_MARKS) and "NO API KEYS" not in line
    ]
    (busy0, total0), (busy1, total1) = before[3], after[3]
    return Measured(
        requests=len(result["rows"]),
        tokens=result["completion_tokens"],
        seconds=result["seconds"],
        front_cpu=after[0] - before[0],
        workers_cpu=after[1] - before[1],
        postgres_cpu=after[2] - before[2],
        machine_busy=(busy1 - busy0) / max(total1 - total0, 1) * (os.cpu_count() or 1),
        problems=problems,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=5000, help="requests in the batch")
    parser.add_argument("--workers", default="1,2,4", help="worker counts for part 2")
    parser.add_argument("--parts", default="1,2a,2b", help="which arms: 1, 2a, 2b")
    parser.add_argument(
        "--instant-max-seqs",
        type=int,
        default=64,
        help="BATCHD_MAX_SEQS for the near-instant engine (2x that many in flight)",
    )
    parser.add_argument(
        "--sim-max-seqs",
        type=int,
        default=4,
        help="BATCHD_MAX_SEQS per worker for the simulated engine (2x that many in flight)",
    )
    parser.add_argument(
        "--sim-tokens", type=int, default=16, help="max_tokens for the simulated engine (<= 19)"
    )
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    worker_counts = [int(k) for k in args.workers.split(",") if k.strip()]
    parts = {p.strip() for p in args.parts.split(",")}
    if args.sim_tokens > 19:
        parser.error("--sim-tokens: the echoed prompts have 19-20 words, so at most 19")
    instant_bodies = small_chat_workload(args.n, 1)
    sim_bodies = small_chat_workload(args.n, args.sim_tokens)
    report: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        report.append(line)

    print(f"machine: {machine()}", flush=True)
    started = time.monotonic()
    unreachable = postgres_unreachable()
    pg_shown = make_url(ADMIN_URL).render_as_string(hide_password=True)
    if unreachable:
        say(
            f"PostgreSQL is not reachable at {pg_shown} ({unreachable}): the PostgreSQL arms"
            " are SKIPPED; start it, or set BATCHD_TEST_POSTGRES_URL"
        )

    def arm(bodies: list[dict[str, Any]], max_seqs: int, workers: int, pg: bool) -> Measured:
        with contextlib.ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-scale-")))
            url = stack.enter_context(fresh_database()) if pg else None
            m = measure(tmp, bodies, max_seqs=max_seqs, database_url=url, workers=workers)
        for line in m.problems[:5]:
            say(f"      ! logged: {line}")
        if len(m.problems) > 5:
            say(f"      ! ... {len(m.problems) - 5} more such log lines")
        return m

    instant_inflight = 2 * args.instant_max_seqs
    instant_ceiling = instant_inflight / STEP_SECONDS
    instant_label = (
        f"near-instant engine: fake, max_tokens 1 = one 10 ms step per request,"
        f" {instant_inflight} in flight per process (engine ceiling {instant_ceiling:,.0f}"
        " requests/s per process)"
    )
    if "1" in parts:
        say(
            f"1. queue overhead, one batch of {args.n} chat requests, upload to downloaded"
            f" output; {instant_label}"
        )
        sqlite = arm(instant_bodies, args.instant_max_seqs, 0, pg=False)
        say(
            f"   SQLite     (batchd serve):                 {sqlite.requests} in"
            f" {sqlite.seconds:.1f} s = {sqlite.rps:.0f} req/s, {sqlite.ms_per_request:.2f}"
            f" ms/request; {sqlite.cpu_note(False)}"
        )
        if unreachable:
            say("   PostgreSQL: SKIPPED (not reachable)")
        else:
            pg = arm(instant_bodies, args.instant_max_seqs, 0, pg=True)
            say(
                f"   PostgreSQL (batchd serve --database-url):  {pg.requests} in"
                f" {pg.seconds:.1f} s = {pg.rps:.0f} req/s, {pg.ms_per_request:.2f}"
                f" ms/request; {pg.cpu_note(True)}"
            )
            say(
                f"   ratio PostgreSQL/SQLite: {pg.ms_per_request / sqlite.ms_per_request:.2f}x"
                f" the per-request overhead ({pg.rps / sqlite.rps:.2f}x the throughput)"
            )

    def scaling(bodies: list[dict[str, Any]], max_seqs: int, ceiling: float | None) -> None:
        """ceiling: the simulated engine's requests/s per worker (None: near-instant)."""
        base: Measured | None = None
        for k in worker_counts:
            m = arm(bodies, max_seqs, k, pg=True)
            base = base or m
            first = worker_counts[0]
            rate = f"{m.rps:.0f} req/s"
            if ceiling is not None:
                rate += f", {m.tps:.0f} tok/s = {m.rps / (k * ceiling):.0%} of the K-worker ceiling"
            say(
                f"   K={k}: {m.requests} requests"
                + (f", {m.tokens} tokens" if ceiling is not None else "")
                + f" in {m.seconds:.1f} s = {rate}; speed-up {m.rps / base.rps:.2f}x vs"
                f" K={first} (ideal {k / first:.1f}x); {m.cpu_note(True)}"
            )

    if {"2a", "2b"} & parts:
        say(
            f"2. workers on PostgreSQL: 1 batchd api + K batchd worker processes, a fresh"
            f" database per K; one batch of {args.n} chat requests, upload to downloaded output"
        )
        if unreachable:
            say("   SKIPPED (PostgreSQL not reachable)")
        if "2a" in parts and not unreachable:
            say(f"   a. {instant_label}; bounded by the database and this machine's CPU")
            scaling(instant_bodies, args.instant_max_seqs, None)
        if "2b" in parts and not unreachable:
            inflight = 2 * args.sim_max_seqs
            per_worker = inflight / (args.sim_tokens * STEP_SECONDS)
            say(
                f"   b. SIMULATED engine (fake, not a model): each worker owns {inflight}"
                f" sequences at 10 ms/token, max_tokens {args.sim_tokens}; ceiling"
                f" {per_worker:.0f} req/s = {per_worker * args.sim_tokens:.0f} tok/s per worker"
            )
            scaling(sim_bodies, args.sim_max_seqs, per_worker)

    print(f"(whole run: {time.monotonic() - started:.0f} s)", flush=True)
    if not args.no_record:
        command = (
            f"python bench/bench_scale.py --n {args.n} --workers {args.workers} --parts"
            f" {args.parts} --instant-max-seqs {args.instant_max_seqs} --sim-max-seqs"
            f" {args.sim_max_seqs} --sim-tokens {args.sim_tokens}"
        )
        append_record(command, report, "scale-out")


if __name__ == "__main__":
    main()
