"""The one place where errors become wire bodies: OpenAI's or Anthropic's, by surface."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from batchd import ids
from batchd.api.responses import JSONResponse
from batchd.errors import BatchdError, LimitExceeded

log = logging.getLogger(__name__)

_ANTHROPIC_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
}


def is_anthropic(request: Request) -> bool:
    # Collapse repeated slashes: '//v1/messages' must still get Anthropic's error shape.
    return re.sub("/+", "/", request.url.path).startswith("/v1/messages")


def error_response(
    request: Request,
    status: int,
    message: str,
    *,
    openai_type: str,
    anthropic_type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any]
    if is_anthropic(request):
        # The body's request_id is the response's x-request-id (RequestIdMiddleware keeps a
        # header that is already there), as on Anthropic's API: one id to quote, not two.
        request_id = ids.request_id()
        body = {
            "type": "error",
            "error": {"type": anthropic_type, "message": message},
            "request_id": request_id,
        }
        headers = {**(headers or {}), "x-request-id": request_id}
    else:
        body = {"error": {"message": message, "type": openai_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(BatchdError)
    async def _batchd_error(request: Request, exc: BatchdError) -> JSONResponse:
        headers = None
        if isinstance(exc, LimitExceeded):
            headers = {"Retry-After": str(exc.retry_after)}
        message = exc.message if exc.line is None else f"Line {exc.line}: {exc.message}"
        return error_response(
            request,
            exc.status_code,
            message,
            openai_type=exc.openai_type,
            anthropic_type=exc.anthropic_type,
            param=exc.param,
            code=exc.code,
            headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = _loc_to_param(tuple(first.get("loc", ())))
        got = ""
        if first.get("type") != "missing" and "input" in first:
            shown = repr(first["input"])  # the value sent, e.g. a query's limit=0
            got = f" (got {shown[:80]}{'...' if len(shown) > 80 else ''})"
        return error_response(
            request,
            400,
            f"Invalid '{param}': {first.get('msg')}{got}.",
            openai_type="invalid_request_error",
            anthropic_type="invalid_request_error",
            param=param,
            code="invalid_value",
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}."
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
        return error_response(
            request,
            exc.status_code,
            message,
            openai_type="invalid_request_error",
            anthropic_type=_ANTHROPIC_HTTP_TYPES.get(exc.status_code, "api_error"),
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"action": "unhandled_error"})
        return error_response(
            request,
            500,
            "The server had an error while processing your request.",
            openai_type="server_error",
            anthropic_type="api_error",
        )
