"""A small fault-injecting HTTP proxy for tests, in a thread of the test process.

It sits in front of a real upstream and, for a chosen fraction of requests, answers 429 with
``Retry-After``, answers 500, resets the connection, or stalls (sends nothing for a while, then
closes); the rest are forwarded (streams included). It measures what the upstream side sees:
every request's arrival time and path, and the most requests it held at once.

Faults are drawn from a seeded RNG, so a run is repeatable. A body containing
``FAIL_400_MARKER`` is answered with a 400 and a known body (a final upstream error), whatever
the fractions say. One request per connection (``Connection: close``) keeps the HTTP side
small: this is a test instrument, not a proxy to deploy.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
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


@dataclass
class Faults:
    rate_limit: float = 0.0  # answer 429 with Retry-After: retry_after
    server_error: float = 0.0  # answer 500
    reset: float = 0.0  # close the connection with a TCP RST, nothing answered
    stall: float = 0.0  # hold the connection stall_seconds, then close it unanswered
    retry_after: int = 1
    stall_seconds: float = 5.0
    seed: int = 1234


@dataclass
class Seen:
    arrived: float
    path: str
    outcome: str  # "forwarded", "429", "500", "reset", "stall", "400"
    body: bytes = b""
    authorization: str | None = None


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
        with self._lock:
            self.faults = faults
            self._rng = random.Random(faults.seed)

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
        if FAIL_400_MARKER.encode() in body:
            return "400"
        with self._lock:
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
        outcome = self._draw(body)
        with self._lock:
            self.seen.append(Seen(time.time(), path, outcome, body, headers.get("authorization")))
            self._inflight += 1
            self.max_inflight = max(self.max_inflight, self._inflight)
            self.events.append((time.time(), 1))
        try:
            await self._answer_until_client_leaves(
                outcome, method, path, headers, body, reader, writer
            )
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with self._lock:
                self._inflight -= 1
                self.events.append((time.time(), -1))
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer_until_client_leaves(
        self,
        outcome: str,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Answer, but stop as soon as the client hangs up: a request the client has given up
        on (its timeout fired and it closed the socket) no longer counts as in flight, which is
        what the client's concurrency limit is about."""
        answer = asyncio.ensure_future(self._answer(outcome, method, path, headers, body, writer))
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
        outcome: str,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        writer: asyncio.StreamWriter,
    ) -> None:
        if outcome == "429":
            await _respond(
                writer,
                429,
                b'{"error":{"message":"slow down","type":"rate_limit_error"}}',
                {"retry-after": str(self.faults.retry_after)},
            )
        elif outcome == "500":
            await _respond(writer, 500, b'{"error":{"message":"boom","type":"server_error"}}')
        elif outcome == "400":
            await _respond(writer, 400, FAIL_400_BODY)
        elif outcome == "reset":
            sock = writer.get_extra_info("socket")
            # SO_LINGER 0: close() sends a TCP RST instead of a graceful FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        elif outcome == "stall":
            await asyncio.sleep(self.faults.stall_seconds)
        else:
            await self._forward(method, path, headers, body, writer)

    async def _forward(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        writer: asyncio.StreamWriter,
    ) -> None:
        keep = {k: v for k, v in headers.items() if k in ("content-type", "authorization")}
        request = self._client.build_request(
            method, self.upstream + path, content=body, headers=keep
        )
        response = await self._client.send(request, stream=True)
        try:
            content_type = response.headers.get("content-type", "application/json")
            writer.write(
                f"HTTP/1.1 {response.status_code} X\r\ncontent-type: {content_type}\r\n"
                "connection: close\r\n\r\n".encode()
            )
            async for chunk in response.aiter_bytes():
                writer.write(chunk)
                await writer.drain()
        finally:
            await response.aclose()


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
