"""Webhook endpoints per tenant, as OpenAI's API has them (``client.webhooks`` in the SDK):
create (the signing secret shown once), retrieve, update, list, delete, rotate the secret,
send a test event; and the deliveries made to one (ours). Sending is
service/webhook_sender.py.

Both spellings of the create body are taken: the SDK's (``event_types``, ``name``) and the
short one (``events``); the answer carries both (``event_types`` and ``events``,
``signing_secret`` and ``secret``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from batchd import ids
from batchd.errors import InvalidRequest, NotFound
from batchd.protocol.openai import objects as oa_objects
from batchd.service.services import Services
from batchd.service.webhook_sender import attempt, check_url
from batchd.store.webhooks import EVENT_TYPES, event_body

MAX_DELIVERIES_LISTED = 100
MAX_NAME_CHARS = 256


def _hint(secret: str) -> str:
    return secret[:10] + "…" + secret[-4:]


def endpoint_object(row: dict[str, Any], *, with_secret: bool = False) -> dict[str, Any]:
    events = orjson.loads(row["events"])
    body = {
        "id": row["id"],
        "object": "webhook_endpoint",
        "name": row["name"],
        "url": row["url"],
        "event_types": events,
        "events": events,
        "signing_secret_hint": _hint(row["secret"]),
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }
    if with_secret:
        body["signing_secret"] = body["secret"] = row["secret"]
    return body


def _events(value: object, param: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"{param} must be a non-empty list of event types.", param=param)
    unknown = [v for v in value if v not in EVENT_TYPES]
    if unknown:
        raise InvalidRequest(
            f"Unsupported event type {unknown[0][:64]!r}: batchd sends {', '.join(EVENT_TYPES)}.",
            param=param,
        )
    return list(dict.fromkeys(value))


def _fields(services: Services, body: Any, *, creating: bool) -> dict[str, Any]:
    """The endpoint columns a create or update body sets, checked."""
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.", param="body")
    extra = sorted(set(body) - {"url", "name", "event_types", "events"})
    if extra:
        raise InvalidRequest(f"Unknown parameter {extra[0][:64]!r}.", param=extra[0][:64])
    values: dict[str, Any] = {}
    url = body.get("url")
    if url is not None or creating:
        if not isinstance(url, str):
            raise InvalidRequest("Missing required parameter: 'url'.", param="url")
        values["url"] = check_url(url, services.settings.webhook_allow_hosts)
    for param in ("event_types", "events"):
        if body.get(param) is not None:
            values["events"] = orjson.dumps(_events(body[param], param)).decode()
    if creating and "events" not in values:
        values["events"] = orjson.dumps(list(EVENT_TYPES)).decode()
    name = body.get("name")
    if name is not None:
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise InvalidRequest(
                f"name must be a string of 1 to {MAX_NAME_CHARS} characters.", param="name"
            )
        values["name"] = name
    elif creating:
        values["name"] = urlsplit(values["url"]).hostname or "webhook"
    return values


def create_endpoint(services: Services, tenant: str, body: Any) -> dict[str, Any]:
    """A new endpoint for ``tenant``; the answer carries the signing secret, this once."""
    values = _fields(services, body, creating=True)
    limit = services.settings.webhook_endpoints_per_tenant
    existing, _ = services.store.webhook_endpoints(tenant, after=None, limit=limit)
    if len(existing) >= limit:
        raise InvalidRequest(
            f"A tenant may have at most {limit} webhook endpoints; delete one first.",
            param="url",
        )
    at = int(time.time())
    row = {
        **values,
        "id": ids.webhook_endpoint_id(),
        "tenant": tenant,
        "secret": ids.webhook_secret(),
        "created_at": at,
        "updated_at": at,
    }
    services.store.create_webhook_endpoint(row)
    return endpoint_object(row, with_secret=True)


def get_endpoint(services: Services, tenant: str, endpoint_id: str) -> dict[str, Any]:
    row = services.store.webhook_endpoint(tenant, endpoint_id)
    if row is None:
        raise NotFound(
            f"No webhook endpoint found with id '{endpoint_id[:80]}'.",
            param="webhook_endpoint_id",
        )
    return row


def update_endpoint(services: Services, tenant: str, endpoint_id: str, body: Any) -> dict[str, Any]:
    values = _fields(services, body, creating=False)
    get_endpoint(services, tenant, endpoint_id)
    if values:
        values["updated_at"] = int(time.time())
        services.store.update_webhook_endpoint(tenant, endpoint_id, values)
    return endpoint_object(get_endpoint(services, tenant, endpoint_id))


def rotate_secret(services: Services, tenant: str, endpoint_id: str) -> dict[str, Any]:
    """A new signing secret, shown this once; deliveries from now on are signed with it."""
    get_endpoint(services, tenant, endpoint_id)
    services.store.update_webhook_endpoint(
        tenant, endpoint_id, {"secret": ids.webhook_secret(), "updated_at": int(time.time())}
    )
    return endpoint_object(get_endpoint(services, tenant, endpoint_id), with_secret=True)


def list_endpoints(
    services: Services, tenant: str, after: str | None, limit: int
) -> dict[str, Any]:
    rows, has_more = services.store.webhook_endpoints(tenant, after=after, limit=limit)
    return oa_objects.list_object([endpoint_object(row) for row in rows], has_more)


def delete_endpoint(services: Services, tenant: str, endpoint_id: str) -> dict[str, Any]:
    if not services.store.delete_webhook_endpoint(tenant, endpoint_id):
        raise NotFound(
            f"No webhook endpoint found with id '{endpoint_id[:80]}'.",
            param="webhook_endpoint_id",
        )
    return {"id": endpoint_id, "object": "webhook_endpoint.deleted", "deleted": True}


async def send_test(services: Services, tenant: str, endpoint_id: str, body: Any) -> dict[str, Any]:
    """Send a sample event of ``event_type`` to the endpoint now, once, signed like every
    delivery (its ``data.id`` names no real batch), and answer the receiver's status; the
    attempt is recorded among the endpoint's deliveries."""
    event_type = body.get("event_type", "batch.completed") if isinstance(body, dict) else None
    if event_type not in EVENT_TYPES:
        raise InvalidRequest(
            f"event_type must be one of {', '.join(EVENT_TYPES)}.", param="event_type"
        )
    row = await asyncio.to_thread(get_endpoint, services, tenant, endpoint_id)
    event_id = ids.webhook_event_id()
    at = int(time.time())
    payload = event_body(event_id, str(event_type), "batch_test_" + event_id[4:], at)
    delivery = {**row, "event_id": event_id, "payload": payload}
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
        result = await attempt(client, delivery, services.settings)
    await asyncio.to_thread(
        services.store.record_test_delivery,
        tenant,
        endpoint_id,
        event_id,
        str(event_type),
        payload,
        at=time.time(),
        delivered=result.delivered,
        status=result.status,
        error=result.error,
    )
    return {
        "object": "webhook_endpoint.test",
        "webhook_endpoint_id": endpoint_id,
        "event_type": event_type,
        "event_id": event_id,
        "success": True,
        "status_code": result.status or 0,
        "error": result.error,
    }


def list_deliveries(services: Services, tenant: str, endpoint_id: str) -> dict[str, Any]:
    """The endpoint's deliveries, newest first: event, state, attempts and the last one's
    status or error excerpt."""
    get_endpoint(services, tenant, endpoint_id)
    rows = services.store.webhook_deliveries(tenant, endpoint_id, MAX_DELIVERIES_LISTED)
    data = [
        {
            "object": "webhook_delivery",
            "event_id": row["event_id"],
            "type": row["type"],
            "state": row["state"],
            "attempts": row["attempts"],
            "created_at": row["created_at"],
            "last_attempt_at": row["last_attempt_at"],
            "next_attempt_at": row["next_attempt_at"] if row["state"] == "pending" else None,
            "last_status": row["last_status"],
            "last_error": row["last_error"],
            "delivered_at": row["delivered_at"],
        }
        for row in rows
    ]
    return {"object": "list", "data": data, "has_more": False}
