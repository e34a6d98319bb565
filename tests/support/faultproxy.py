"""A small fault-injecting HTTP proxy for tests, in a thread of the test process.

It sits in front of a real upstream and, for a chosen fraction of requests, answers 429 with
``Retry-After``, answers 500, resets the connection, or stalls (sends nothing for a while, then
closes); the rest are forwarded (streams included). It measures what the upstream side sees:
every request's arrival time and path, and the most requests it held at once.

Faults are drawn from a seeded RNG, so a run is repeatable. A body containing
``please-fail-with-NNN`` (``FAIL_400_MARKER``, ``fail_marker(409)``) is answered with that status
and a known body (``fail_body``: a final upstream error), whatever the fractions say. A script
(``FaultProxy.script``) gives the requests whose body holds a marker a fixed list of outcomes,
one per attempt, before they are forwarded. Forwarded requests can be delayed (a slow
upstream) or, for streams, stalled after their first chunk. Each request's answered usage
(``usage`` of a JSON body or of an SSE event) is recorded, as the upstream reported it. One
request per connection (``Connection: close``) keeps the HTTP side small: this is a test
instrument, not a proxy to deploy.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

FAIL_400_MARKER = "please-fail-with-400"
FAIL_400_BODY = (
    b'{"error":{"message":"upstream refuses this prompt","type":"invalid_request_error",'
    b'"param":"messages","code":"upstream_says_no"}}'
)
_FAIL_MARKER = re.compile(rb"please-fail-with-([1-5][0-9][0-9])")
MAX_RECORDED_ANSWER_BYTES = 1 << 20


def fail_marker(status: int) -> str:
    """Text that makes the proxy answer ``status`` with ``fail_body(status)``."""
    return f"please-fail-with-{status}"


def fail_body(status: int) -> bytes:
    if status == 400:
        return FAIL_400_BODY
    return (
        b'{"error":{"message":"upstream refuses this prompt with %d","type":'
        b'"invalid_request_error","param":null,"code":"upstream_says_%d"}}' % (status, status)
    )


@dataclass
class Faults:
    rate_limit: float = 0.0  # answer 429 with Retry-After: retry_after
    server_error: float = 0.0  # answer 500
    reset: float = 0.0  # close the connection with a TCP RST, nothing answered
    stall: float = 0.0  # hold the connection stall_seconds, then close it unanswered
    retry_after: int = 1
    stall_seconds: float = 5.0
    seed: int = 1234
    delay_seconds: float = 0.0  # a forwarded request waits this long first (a slow upstream)
    stall_mid_stream: bool = False  # forwarded: after the first chunk, stall_seconds of nothing


@dataclass
class Seen:
    arrived: float
    path: str
    outcome: str  # "forwarded", "429", "500", "reset", "stall", or a marker's "409"...
    body: bytes = b""
    authorization: str | None = None
    ended: float | None = None  # when the proxy was done with it (answered, or hung up on)
    usage_tokens: int | None = None  # prompt + completion tokens the upstream reported


@dataclass
class FaultProxy:
    upstream: str  # e.g. http://127.0.0.1:8001
    faults: Faults = field(default_factory=Faults)
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    max_inflight: int = 0
    # (time, +1 | -1) at every request's arrival and end: concurrency over any window.
    events: list[tuple[float, int]] = field(default_factory=list)
    _inflight: int = 0
    _scripts: dict[str, collections.deque[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ control

    def start(self) -> FaultProxy:
        ready = threading.Event()
        self._rng = random.Random(self.faults.seed)

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._serve(ready))
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            await self._client.aclose()
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        if self._thread is not None:
            self._thread.join(10)

    def reset_stats(self) -> None:
        with self._lock:
            self.seen.clear()
            self.events.clear()
            self.max_inflight = 0

    def set_faults(self, faults: Faults) -> None:
        """New fault fractions; scripts are dropped."""
        with self._lock:
            self.faults = faults
            self._rng = random.Random(faults.seed)
            self._scripts.clear()

    def script(self, marker: str, outcomes: list[str]) -> None:
        """Requests whose body contains ``marker`` meet ``outcomes`` in order, one per attempt
        ("429", "429:2" for a Retry-After of 2 s, "500", "reset", "stall"), then are forwarded."""
        with self._lock:
            self._scripts[marker] = collections.deque(outcomes)

    def for_marker(self, marker: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if marker.encode() in s.body]

    def mean_inflight(self) -> float:
        """Time-weighted mean of requests in flight, from the first arrival to the last end."""
        with self._lock:
            events = sorted(self.events)
        if len(events) < 2:
            return 0.0
        area, level = 0.0, 0
        for (at, delta), (next_at, _) in itertools.pairwise(events):
            level += delta
            area += level * (next_at - at)
        return area / (events[-1][0] - events[0][0])

    def count(self, path_suffix: str = "", outcome: str | None = None) -> int:
        with self._lock:
            return sum(
                1
                for s in self.seen
                if s.path.endswith(path_suffix) and (outcome is None or s.outcome == outcome)
            )

    # ------------------------------------------------------------------ serving

    async def _serve(self, ready: threading.Event) -> None:
        self._client = httpx.AsyncClient(timeout=120, trust_env=False)
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()

    def _draw(self, body: bytes) -> str:
        marked = _FAIL_MARKER.search(body)
        if marked:
            return marked.group(1).decode()
        with self._lock:
            for marker, outcomes in self._scripts.items():
                if outcomes and marker.encode() in body:
                    return outcomes.popleft()
            f = self.faults
            x = self._rng.random()
        for outcome, share in (
            ("429", f.rate_limit),
            ("500", f.server_error),
            ("reset", f.reset),
            ("stall", f.stall),
        ):
            if x < share:
                return outcome
            x -= share
        return "forwarded"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        body = await reader.readexactly(length) if length else b""
        outcome, _, parameter = self._draw(body).partition(":")
        seen = Seen(time.time(), path, outcome, body, headers.get("authorization"))
        with self._lock:
            self.seen.append(seen)
            self._inflight += 1
            self.max_inflight = max(self.max_inflight, self._inflight)
            self.events.append((time.time(), 1))
        try:
            await self._answer_until_client_leaves(seen, parameter, method, headers, reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with self._lock:
                self._inflight -= 1
                seen.ended = time.time()
                self.events.append((seen.ended, -1))
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer_until_client_leaves(
        self,
        seen: Seen,
        parameter: str,
        method: str,
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Answer, but stop as soon as the client hangs up: a request the client has given up
        on (its timeout fired and it closed the socket) no longer counts as in flight, which is
        what the client's concurrency limit is about."""
        answer = asyncio.ensure_future(self._answer(seen, parameter, method, headers, writer))
        hangup = asyncio.ensure_future(reader.read(1))  # b"" once the client closes
        try:
            await asyncio.wait({answer, hangup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (answer, hangup):
                task.cancel()
            await asyncio.gather(answer, hangup, return_exceptions=True)
        if answer.done() and not answer.cancelled() and answer.exception() is not None:
            raise answer.exception()  # type: ignore[misc]

    async def _answer(
        self,
        seen: Seen,
        parameter: str,
        method: str,
        headers: dict[str, str],
        writer: asyncio.StreamWriter,
    ) -> None:
        outcome = seen.outcome
        if outcome == "429":
            await _respond(
                writer,
                429,
                b'{"error":{"message":"slow down","type":"rate_limit_error"}}',
                {"retry-after": parameter or str(self.faults.retry_after)},
            )
        elif outcome == "500":
            await _respond(writer, 500, b'{"error":{"message":"boom","type":"server_error"}}')
        elif outcome.isdigit():
            await _respond(writer, int(outcome), fail_body(int(outcome)))
        elif outcome == "reset":
            sock = writer.get_extra_info("socket")
            # SO_LINGER 0: close() sends a TCP RST instead of a graceful FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        elif outcome == "stall":
            await asyncio.sleep(self.faults.stall_seconds)
        else:
            await self._forward(seen, method, headers, writer)

    async def _forward(
        self, seen: Seen, method: str, headers: dict[str, str], writer: asyncio.StreamWriter
    ) -> None:
        faults = self.faults
        if faults.delay_seconds:
            await asyncio.sleep(faults.delay_seconds)
        keep = {k: v for k, v in headers.items() if k in ("content-type", "authorization")}
        request = self._client.build_request(
            method, self.upstream + seen.path, content=seen.body, headers=keep
        )
        response = await self._client.send(request, stream=True)
        answer = bytearray()
        try:
            content_type = response.headers.get("content-type", "application/json")
            writer.write(
                f"HTTP/1.1 {response.status_code} X\r\ncontent-type: {content_type}\r\n"
                "connection: close\r\n\r\n".encode()
            )
            async for chunk in response.aiter_bytes():
                writer.write(chunk)
                await writer.drain()
                if len(answer) < MAX_RECORDED_ANSWER_BYTES:
                    answer += chunk
                if faults.stall_mid_stream:
                    await asyncio.sleep(faults.stall_seconds)
                    return
        finally:
            await response.aclose()
        seen.usage_tokens = reported_usage(bytes(answer))


def reported_usage(answer: bytes) -> int | None:
    """prompt + completion tokens of the ``usage`` in a JSON body or in an SSE stream's
    events (the last one that has it), or None if the answer reports none."""
    events: list[bytes] = [answer]
    if answer.lstrip().startswith(b"data:"):
        events = [
            line.strip()[5:] for line in answer.split(b"\n") if line.strip().startswith(b"data:")
        ]
    total: int | None = None
    for event in events:
        try:
            usage = json.loads(event).get("usage")
        except (ValueError, AttributeError):
            continue
        if isinstance(usage, dict):
            total = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
    return total


async def _respond(
    writer: asyncio.StreamWriter, status: int, body: bytes, extra: dict[str, str] | None = None
) -> None:
    head = (
        f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n"
    )
    for name, value in (extra or {}).items():
        head += f"{name}: {value}\r\n"
    writer.write(head.encode() + b"\r\n" + body)
    await writer.drain()


@contextlib.contextmanager
def running_proxy(upstream: str, faults: Faults | None = None) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream, faults or Faults()).start()
    try:
        yield proxy
    finally:
        proxy.stop()


class Canary:
    """An HTTP server that must receive nothing: it records every connection it accepts."""

    def __init__(self) -> None:
        self.hits: list[bytes] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(1)
                with contextlib.suppress(OSError):
                    self.hits.append(conn.recv(65536) or b"(connected)")
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(5)
