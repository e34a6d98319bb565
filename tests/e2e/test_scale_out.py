"""Many processes on one PostgreSQL database: two `batchd api` replicas and three `batchd worker`
processes (each with the embedded engine) run batches of two tenants with exactly-once
results; a worker killed with SIGKILL mid-lease has its rows finished by the others, none
twice; a cancel through one replica stops the work the workers hold; a worker stopped with
SIGTERM releases its rows at once."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import create_engine, text

from tests.support.helpers import chat_line, read_jsonl, upload, wait_for
from tests.support.procs import Proc, shared_database_env, wait_healthy
from tests.support.serverproc import free_port

KEY_A, KEY_B = "scale-key-a", "scale-key-b"
LEASE_SECONDS = 4


@dataclass
class Cluster:
    url: str  # the database
    apis: list[tuple[Proc, int]]
    workers: list[Proc]

    def client(self, key: str, replica: int = 0) -> openai.OpenAI:
        port = self.apis[replica][1]
        return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)

    def leased_by(self, worker: Proc) -> int:
        """Rows running under ``worker``'s leases (its owner id is host-pid-token)."""
        assert worker.proc is not None
        engine = create_engine(self.url)
        with engine.connect() as conn:
            count = conn.execute(
                text(
                    "SELECT count(*) FROM requests WHERE state = 'running'"
                    " AND lease_owner LIKE :owner"
                ),
                {"owner": f"%-{worker.proc.pid}-%"},
            ).scalar_one()
        engine.dispose()
        return int(count)

    def states(self) -> dict[str, int]:
        engine = create_engine(self.url)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT state, count(*) FROM requests GROUP BY state")).all()
        engine.dispose()
        return dict(rows)  # type: ignore[arg-type]


@pytest.fixture()
def cluster(postgres_url: str, tmp_path: Path) -> Iterator[Cluster]:
    data_dir = tmp_path / "shared"  # the shared volume every process mounts
    env = shared_database_env(
        postgres_url,
        data_dir,
        f"{KEY_A},{KEY_B}",
        BATCHD_LEASE_SECONDS=str(LEASE_SECONDS),
        BATCHD_MAX_SEQS="6",
        BATCHD_CTX_SIZE="3072",
        BATCHD_N_THREADS="1",  # five processes share two cores
    )
    procs: list[Proc] = []
    try:
        workers = []
        for index in range(3):
            worker = Proc(["worker"], env, tmp_path / f"worker{index}.log").start()
            procs.append(worker)
            worker.wait_for_log("running")  # one at a time: the first converts the model
            workers.append(worker)
        apis = []
        for index in range(2):
            port = free_port()
            api = Proc(["api", "--port", str(port)], env, tmp_path / f"api{index}.log").start()
            procs.append(api)
            apis.append((api, port))
        for api, port in apis:
            wait_healthy(api, port)
        yield Cluster(url=postgres_url, apis=apis, workers=workers)
    finally:
        for proc in procs:
            proc.stop()


def create(client: openai.OpenAI, lines: list[dict[str, object]], window: str = "24h") -> str:
    return client.batches.create(
        input_file_id=upload(client, lines),  # type: ignore[arg-type]
        endpoint="/v1/chat/completions",
        completion_window=window,  # type: ignore[arg-type]
    ).id


def submit(client: openai.OpenAI, prefix: str, n: int, max_tokens: int = 4) -> str:
    lines = [
        chat_line(f"{prefix}{i}", f"Count to {i % 7}.", max_tokens=max_tokens) for i in range(n)
    ]
    return create(client, lines)


def answered_once(client: openai.OpenAI, batch: object, expected: list[str]) -> None:
    outputs = read_jsonl(client, batch.output_file_id) + read_jsonl(client, batch.error_file_id)  # type: ignore[attr-defined]
    ids = [r["custom_id"] for r in outputs]
    assert sorted(ids) == sorted(expected), (len(ids), len(set(ids)), len(expected))


@pytest.mark.slow
def test_replicas_and_workers_run_two_tenants_exactly_once_through_a_kill_9(
    cluster: Cluster,
) -> None:
    a, b = cluster.client(KEY_A, replica=0), cluster.client(KEY_B, replica=1)
    batches = [(a, submit(a, "a1-", 24), "a1-", 24), (b, submit(b, "b1-", 24), "b1-", 24)]
    batches.append((a, submit(cluster.client(KEY_A, replica=1), "a2-", 12), "a2-", 12))
    # Once the victim holds leases of its own, kill it mid-lease.
    victim = cluster.workers[0]
    deadline = time.monotonic() + 120
    while cluster.leased_by(victim) == 0:
        assert time.monotonic() < deadline, cluster.states()
        time.sleep(0.05)
    victim.signal(signal.SIGKILL)
    for client, batch_id, prefix, n in batches:
        done = wait_for(client, batch_id, timeout=600)
        assert done.status == "completed", done
        assert done.request_counts.completed == n
        answered_once(client, done, [f"{prefix}{i}" for i in range(n)])
    # Tenants stay apart across replicas.
    assert {x.id for x in b.batches.list().data} == {batches[1][1]}
    assert cluster.states() == {"succeeded": 60}
    # Three workers saw the last rows finish; each batch has exactly one output file.
    engine = create_engine(cluster.url)
    with engine.connect() as conn:
        outputs = conn.execute(
            text("SELECT filename, count(*) FROM files WHERE purpose = 'batch_output' GROUP BY 1")
        ).all()
    engine.dispose()
    assert sorted(outputs) == sorted((f"{bid}_output.jsonl", 1) for _, bid, _, _ in batches)
    survivors = "".join(w.log() for w in cluster.workers[1:])
    assert "whose lease lapsed" in survivors  # the sweeper requeued the dead worker's rows


@pytest.mark.slow
def test_cancel_through_one_replica_stops_the_workers_and_sigterm_releases_rows(
    cluster: Cluster,
) -> None:
    first, second = cluster.client(KEY_A, replica=0), cluster.client(KEY_A, replica=1)
    batch_id = submit(first, "c-", 60, max_tokens=24)
    leaver = cluster.workers[2]
    deadline = time.monotonic() + 120
    while cluster.leased_by(leaver) == 0:
        assert time.monotonic() < deadline, cluster.states()
        time.sleep(0.1)
    # A clean stop finishes or hands back the worker's rows at once (no lease to wait out).
    leaver.signal(signal.SIGTERM)
    assert leaver.proc is not None and leaver.proc.returncode == 0, leaver.tail()
    assert "in hand before stopping" in leaver.log() or "released" in leaver.log()
    assert cluster.leased_by(leaver) == 0
    second.batches.cancel(batch_id)
    polled = first.batches.retrieve(batch_id)  # the other replica serves polls meanwhile
    assert polled.status in ("cancelling", "cancelled")
    done = wait_for(second, batch_id, timeout=120)
    assert done.status == "cancelled"
    answered_once(second, done, [f"c-{i}" for i in range(60)])
    states = cluster.states()
    assert set(states) <= {"succeeded", "canceled"} and sum(states.values()) == 60
    assert states.get("canceled", 0) > 0, states  # the cancel stopped work that was left


# ----------------------------------------------------- one API, workers started by the test


@dataclass
class Pair:
    """One API replica; the test starts (and kills) the workers itself."""

    url: str
    env: dict[str, str]
    api: Proc
    port: int
    tmp: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key=KEY_A, max_retries=0
        )

    def worker(self, name: str, *args: str, **env: str) -> Proc:
        return Proc(["worker", *args], {**self.env, **env}, self.tmp / f"{name}.log").start()

    def scalar(self, sql: str, **params: object) -> object:
        engine = create_engine(self.url)
        with engine.connect() as conn:
            result = conn.execute(text(sql), params).scalar()
        engine.dispose()
        return result


@pytest.fixture()
def pair(postgres_url: str, tmp_path: Path) -> Iterator[Pair]:
    env = shared_database_env(
        postgres_url,
        tmp_path / "shared",
        KEY_A,
        BATCHD_LEASE_SECONDS=str(LEASE_SECONDS),
        BATCHD_MAX_SEQS="4",
        BATCHD_CTX_SIZE="2048",
        BATCHD_N_THREADS="1",
    )
    port = free_port()
    api = Proc(["api", "--port", str(port)], env, tmp_path / "api.log").start()
    try:
        wait_healthy(api, port)
        yield Pair(url=postgres_url, env=env, api=api, port=port, tmp=tmp_path)
    finally:
        api.stop()


def scrape(url: str) -> str:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    return response.text


def sample(text_: str, name: str) -> float:
    """Sum of every sample of ``name`` (any labels) in a Prometheus text page."""
    total = 0.0
    for line in text_.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
def test_kill_9_during_finalize_still_finalizes_once(pair: Pair) -> None:
    client = pair.client()
    stuck = pair.worker("stuck", BATCHD_FAILPOINTS="finalize.before_commit=sleep(600)")
    try:
        batch_id = submit(client, "f-", 6)
        # The worker ran every row, wrote the result files, and stopped just before the
        # commit that ends the batch: kill it there.
        stuck.wait_for_log("failpoint finalize.before_commit reached", timeout=300)
        assert client.batches.retrieve(batch_id).status == "finalizing"
        stuck.signal(signal.SIGKILL)
    finally:
        stuck.stop()
    assert client.batches.retrieve(batch_id).status == "finalizing"
    metrics_port = free_port()
    rescuer = pair.worker("rescuer", "--metrics-port", str(metrics_port))
    try:
        done = wait_for(client, batch_id, timeout=300)
        assert done.status == "completed" and done.request_counts.completed == 6
        answered_once(client, done, [f"f-{i}" for i in range(6)])
        # One output file was committed for the batch, whatever the dead worker had written.
        outputs = pair.scalar(
            "SELECT count(*) FROM files WHERE filename = :name", name=f"{batch_id}_output.jsonl"
        )
        assert outputs == 1
        assert pair.scalar("SELECT count(*) FROM requests WHERE state = 'succeeded'") == 6
        # The rescuer's own metrics: it finalized the batch; it ran none of the rows.
        page = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert 'batchd_batches_finalized_total{status="completed"} 1.0' in page
        assert sample(page, "batchd_leases_claimed_requests_total") == 0
        assert 'batchd_queue_requests{state="succeeded"} 6.0' in page
    finally:
        rescuer.stop()


@pytest.mark.slow
def test_drain_runs_the_queue_dry_then_exits_and_sigterm_finishes_work_in_hand(
    pair: Pair,
) -> None:
    client = pair.client()
    first = submit(client, "d-", 8)
    second = submit(client, "e-", 4)
    metrics_port = free_port()
    drainer = pair.worker("drainer", "--drain", "--metrics-port", str(metrics_port))
    assert drainer.proc is not None
    saw_metrics = ""
    deadline = time.monotonic() + 300
    while drainer.proc.poll() is None:  # it exits by itself once nothing is left
        assert time.monotonic() < deadline, drainer.tail()
        with contextlib.suppress(httpx.HTTPError, AssertionError):
            saw_metrics = scrape(f"http://127.0.0.1:{metrics_port}/metrics") or saw_metrics
        time.sleep(0.3)
    assert drainer.proc.returncode == 0, drainer.tail()
    assert "drained: no work left" in drainer.log()
    for batch_id, prefix, n in ((first, "d-", 8), (second, "e-", 4)):
        done = client.batches.retrieve(batch_id)
        assert done.status == "completed", done
        answered_once(client, done, [f"{prefix}{i}" for i in range(n)])
    assert "batchd_leases_held_requests" in saw_metrics  # scraped while it worked

    # SIGTERM: no more leasing, the requests in hand finish and commit, the rest are queued.
    third = submit(client, "t-", 12, max_tokens=16)
    worker = pair.worker("graceful", BATCHD_SHUTDOWN_GRACE_SECONDS="120")
    deadline = time.monotonic() + 300
    while pair.scalar("SELECT count(*) FROM requests WHERE state = 'running'") == 0:
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.1)
    worker.signal(signal.SIGTERM)
    assert worker.proc is not None and worker.proc.returncode == 0, worker.tail()
    assert "finished" in worker.log() and "in hand before stopping" in worker.log()
    assert pair.scalar("SELECT count(*) FROM requests WHERE state = 'running'") == 0
    finished = pair.scalar(
        "SELECT count(*) FROM requests WHERE batch_id = :b AND state = 'succeeded'", b=third
    )
    assert 1 <= int(finished) <= 12  # type: ignore[call-overload]
    # Another worker picks up where it stopped; each request is answered once.
    closer = pair.worker("closer", "--drain")
    try:
        done = wait_for(client, third, timeout=300)
        assert done.status == "completed"
        answered_once(client, done, [f"t-{i}" for i in range(12)])
    finally:
        closer.stop()


# ------------------------------------ scheduling across workers, on the fake engine (says so)

FAKE = {"BATCHD_ENGINE": "fake"}  # these tests are about who stops what, not about the model


def long_lines(prefix: str, n: int, words: int) -> list[dict[str, object]]:
    """Lines the fake engine answers with ``words`` tokens (it echoes the prompt's words)."""
    return [
        chat_line(f"{prefix}{i}", " ".join(["word"] * words), max_tokens=words) for i in range(n)
    ]


def held_by(metrics_port: int) -> float:
    return sample(scrape(f"http://127.0.0.1:{metrics_port}/metrics"), "batchd_leases_held_requests")


def wait_held(metrics_port: int, want: float, worker: Proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    held: float | None = None
    while held != want:
        assert time.monotonic() < deadline, f"holds {held}, want {want}:\n{worker.tail()}"
        with contextlib.suppress(httpx.HTTPError):  # its metrics port may not be up yet
            held = held_by(metrics_port)
        time.sleep(0.1)


@pytest.mark.slow
def test_cancel_and_expiry_stop_the_worker_that_holds_the_rows(pair: Pair) -> None:
    """A cancel through the API and a lapsed completion window must stop the tasks of the
    worker holding the rows, whichever worker's tick sees the batch first. Each request would
    take the fake engine 100 s (200 tokens at 0.5 s); the holder ticks every 3 s, a bystander
    worker every 0.2 s, so the bystander almost always sees the cancel first."""
    client = pair.client()
    expiring = create(client, long_lines("x-", 4, 200), window="1m")
    cancelled = create(client, long_lines("c-", 4, 200))
    holder_port = free_port()
    holder = pair.worker(
        "holder",
        "--metrics-port",
        str(holder_port),
        **FAKE,
        BATCHD_FAKE_STEP_SECONDS="0.5",
        BATCHD_POLL_INTERVAL_SECONDS="3",
    )
    bystander = None
    try:
        holder.wait_for_log("running")
        wait_held(holder_port, 8, holder, timeout=120)  # every row of both batches
        bystander = pair.worker("bystander", **FAKE)
        bystander.wait_for_log("running")

        client.batches.cancel(cancelled)
        done = wait_for(client, cancelled, timeout=60)
        assert done.status == "cancelled" and done.request_counts.failed == 4, done
        answered_once(client, done, [f"c-{i}" for i in range(4)])
        wait_held(holder_port, 4, holder, timeout=30)  # it stopped the cancelled rows' tasks

        done = wait_for(client, expiring, timeout=180)
        assert done.status == "expired", done
        answered_once(client, done, [f"x-{i}" for i in range(4)])
        wait_held(holder_port, 0, holder, timeout=30)
        page = scrape(f"http://127.0.0.1:{holder_port}/metrics")
        # Stopped, not run to the end and then refused by the fence.
        assert sample(page, "batchd_leases_lost_requests_total") == 0
        assert pair.scalar("SELECT count(*) FROM requests WHERE state = 'canceled'") == 4
        assert pair.scalar("SELECT count(*) FROM requests WHERE state = 'expired'") == 4
    finally:
        holder.stop()
        if bystander is not None:
            bystander.stop()


@pytest.mark.slow
def test_a_worker_frozen_past_its_lease_writes_nothing_when_it_wakes(pair: Pair) -> None:
    """SIGSTOP a worker mid-lease (a GC pause, a frozen VM): its leases lapse, another worker
    sweeps the rows back and answers them; woken with SIGCONT, the first worker's heartbeat
    finds its leases gone and stops those requests. Every request is answered once."""
    client = pair.client()
    batch_id = create(client, long_lines("z-", 8, 30))
    frozen_port = free_port()
    frozen = pair.worker(
        "frozen", "--metrics-port", str(frozen_port), **FAKE, BATCHD_FAKE_STEP_SECONDS="0.3"
    )
    rescuer = None
    try:
        wait_held(frozen_port, 8, frozen, timeout=120)  # 9 s of work each
        assert frozen.proc is not None
        frozen.proc.send_signal(signal.SIGSTOP)
        rescuer = pair.worker("rescuer", **FAKE, BATCHD_FAKE_STEP_SECONDS="0.01")
        done = wait_for(client, batch_id, timeout=120)
        assert done.status == "completed" and done.request_counts.completed == 8, done
        # The rescuer took every row over: each was leased a second time, with a new epoch.
        assert (
            pair.scalar("SELECT min(lease_epoch) FROM requests WHERE batch_id = :b", b=batch_id)
            == 2
        )
        frozen.proc.send_signal(signal.SIGCONT)
        frozen.wait_for_log("lost the lease of 8 request(s)", timeout=60)
        wait_held(frozen_port, 0, frozen, timeout=30)
        assert "result not committed" not in frozen.log()  # stopped before it could try
        answered_once(client, done, [f"z-{i}" for i in range(8)])
        assert pair.scalar("SELECT count(*) FROM requests WHERE state = 'succeeded'") == 8
    finally:
        if frozen.proc is not None and frozen.proc.poll() is None:
            frozen.proc.send_signal(signal.SIGCONT)
        frozen.stop()
        if rescuer is not None:
            rescuer.stop()
