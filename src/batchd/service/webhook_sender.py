"""Sending webhooks: the outbox's due deliveries, signed the Standard Webhooks way, retried
with exponential backoff for ``webhook_retry_window_seconds``, by one process at a time.

Every process with a database runs ``run_forever``; a lease in the database
(``Store.hold_singleton``) lets one of them send while the others wait, and when that one
dies its lease runs out and another takes over, so delivery survives restarts and kill -9.
Delivery is at least once: a sender that dies after the receiver answered 2xx but before the
row says so sends again; receivers deduplicate on ``webhook-id`` (the event id), as the
Standard Webhooks spec asks of them.

Safe by default: a URL must be https unless its host is allowed (``BATCHD_WEBHOOK_ALLOW_HOSTS``),
and every address its host resolves to must be public (not private, loopback, link-local,
multicast or reserved) unless allowed; redirects are not followed; each attempt has a short
timeout; of the receiver's answer only the status and a short excerpt are kept."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import random
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from batchd.config import Settings
from batchd.errors import InvalidRequest
from batchd.store.store import Store

log = logging.getLogger(__name__)

LEASE_NAME = "webhook-sender"
LEASE_SECONDS = 30.0
POLL_SECONDS = 1.0
BATCH = 50  # deliveries read per pass
PARALLEL = 8  # attempts in flight at once
MAX_BACKOFF_SECONDS = 3600.0
EXCERPT_CHARS = 200
USER_AGENT = "batchd-webhooks"


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,`` and the base64 HMAC-SHA256, keyed with the
    secret's bytes (after ``whsec_``), over ``<id>.<timestamp>.<body>``."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{event_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def check_url(url: str, allow_hosts: list[str]) -> str:
    """The URL if an endpoint may have it; InvalidRequest (param ``url``) saying why not."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018  # raises for a port that is not a number in range
    except ValueError as exc:
        raise InvalidRequest(f"url is not a valid URL: {exc}.", param="url") from None
    if parts.scheme not in ("https", "http") or not host:
        raise InvalidRequest("url must be an absolute https:// URL.", param="url")
    if parts.username or parts.password:
        raise InvalidRequest("url must not carry credentials.", param="url")
    allowed = host in {h.lower() for h in allow_hosts}
    if parts.scheme != "https" and not allowed:
        raise InvalidRequest(
            f"url must be https:// (http is allowed only for hosts in"
            f" BATCHD_WEBHOOK_ALLOW_HOSTS; {host!r} is not).",
            param="url",
        )
    if not allowed:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is not None and not address.is_global:
            raise InvalidRequest(
                f"url's address {host} is not public; allow it with BATCHD_WEBHOOK_ALLOW_HOSTS.",
                param="url",
            )
    if len(url) > 2048:
        raise InvalidRequest("url is longer than 2,048 characters.", param="url")
    return url


def _public(address: str) -> bool:
    return ipaddress.ip_address(address.split("%")[0]).is_global


def resolve_checked(host: str, port: int, allow_hosts: list[str]) -> None:
    """Raise ConnectionRefusedError when ``host`` (not allowed) resolves to any address
    that is not public: private, loopback, link-local and the rest are refused."""
    if host.lower() in {h.lower() for h in allow_hosts}:
        return
    infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    for info in infos:
        address = str(info[4][0])
        if not _public(address):
            raise ConnectionRefusedError(f"{host} resolves to {address}, which is not public")


def next_attempt(created_at: float, attempts: int, at: float, settings: Settings) -> float | None:
    """When to try again after the ``attempts``-th failure (1 for the first): the base
    doubled each time, at most an hour apart, with a little jitter; None once past the
    retry window after the event."""
    delay = min(settings.webhook_retry_base_seconds * 2.0 ** (attempts - 1), MAX_BACKOFF_SECONDS)
    retry_at = at + delay * random.uniform(1.0, 1.1)
    if retry_at > created_at + settings.webhook_retry_window_seconds:
        return None
    return retry_at


@dataclass(frozen=True)
class Attempt:
    delivered: bool
    status: int | None
    error: str | None


async def attempt(
    client: httpx.AsyncClient, delivery: dict[str, Any], settings: Settings
) -> Attempt:
    """One POST of a delivery, signed now (the timestamp is the attempt's)."""
    url = str(delivery["url"])
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        await asyncio.to_thread(
            resolve_checked, parts.hostname or "", port, settings.webhook_allow_hosts
        )
        body = bytes(delivery["payload"])
        timestamp = int(time.time())
        response = await client.post(
            url,
            content=body,
            headers={
                "content-type": "application/json",
                "user-agent": USER_AGENT,
                "webhook-id": str(delivery["event_id"]),
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(
                    str(delivery["secret"]), str(delivery["event_id"]), timestamp, body
                ),
            },
            timeout=settings.webhook_timeout_seconds,
        )
    except (httpx.HTTPError, OSError) as exc:
        return Attempt(False, None, f"{type(exc).__name__}: {exc}"[:EXCERPT_CHARS])
    if 200 <= response.status_code < 300:
        return Attempt(True, response.status_code, None)
    excerpt = response.text[:EXCERPT_CHARS]  # only an excerpt of what the receiver said
    return Attempt(False, response.status_code, f"HTTP {response.status_code}: {excerpt}")


class WebhookSender:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"

    async def send_due(self, client: httpx.AsyncClient) -> int:
        """One pass: attempt every due delivery (a few at a time) and record each outcome."""
        due = await asyncio.to_thread(self.store.due_webhook_deliveries, time.time(), BATCH)
        gate = asyncio.Semaphore(PARALLEL)

        async def one(delivery: dict[str, Any]) -> None:
            async with gate:
                result = await attempt(client, delivery, self.settings)
            at = time.time()
            retry_at = (
                None
                if result.delivered
                else next_attempt(
                    float(delivery["created_at"]), int(delivery["attempts"]) + 1, at, self.settings
                )
            )
            await asyncio.to_thread(
                self.store.record_webhook_attempt,
                int(delivery["seq"]),
                at=at,
                delivered=result.delivered,
                status=result.status,
                error=result.error,
                retry_at=retry_at,
            )

        await asyncio.gather(*(one(d) for d in due))
        return len(due)

    async def run_forever(self) -> None:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
            while True:
                try:
                    held = await asyncio.to_thread(
                        self.store.hold_singleton, LEASE_NAME, self.holder, LEASE_SECONDS
                    )
                    if held:
                        while await self.send_due(client) == BATCH:
                            pass  # a backlog: keep going before sleeping
                except Exception:  # a failed pass is retried at the next poll
                    log.exception("webhook pass failed")
                await asyncio.sleep(POLL_SECONDS)
