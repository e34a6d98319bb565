"""The one exception tree of batchd.

    BatchdError                 any failure we report to a client
    ├── InvalidRequest          400: a field or line is wrong (param=, line=, code=)
    │   └── ContextLengthExceeded  400: prompt + max_tokens beyond the model's context
    ├── Unauthorized            401: missing or unknown API key
    ├── NotFound                404: unknown id, or an id owned by another tenant
    │   └── ModelNotFound       404: a model this server does not serve
    ├── Conflict                409/400: an illegal state transition
    │   └── IdempotencyConflict  409: an Idempotency-Key already used for another request
    ├── PayloadTooLarge         413: a body or upload beyond a configured limit
    ├── RequestTimeout          408: a body that stopped arriving before its end
    ├── LimitExceeded           429: a per-tenant limit; carries retry_after
    ├── EngineError             500: the engine failed for a reason not the caller's
    ├── UpstreamError           the upstream's own status: a final answer from an upstream
    │                           engine (a 4xx other than 429, or a 5xx once retries ran out)
    └── StartupError            a setting or environment the process cannot start with (the
        │                       CLI prints it and exits 2; never an HTTP answer)
        ├── ConfigError         a malformed model registry file, or an unset variable it names
        ├── DatabaseUrlError    a --database-url we cannot use (password hidden)
        ├── BlobUrlError        a BATCHD_FILES_URL we cannot use
        ├── DataDirLocked       another process serves this data dir
        ├── InsecureBind        a non-loopback bind with no API keys
        └── NeedsSharedDatabase `batchd api`/`worker` without PostgreSQL

``IdempotencyKeyTaken`` is no client error: the store raises it to the idempotency service,
which answers with the object the other create made.

Services raise these; ``batchd.api.errors`` alone turns them into the OpenAI or Anthropic wire
shape. Nothing below the API layer raises HTTP exceptions.
"""

from __future__ import annotations

import orjson


class BatchdError(Exception):
    status_code = 500
    openai_type = "server_error"
    anthropic_type = "api_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        line: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.line = line


class InvalidRequest(BatchdError):
    status_code = 400
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    default_code = "invalid_value"


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class Unauthorized(BatchdError):
    status_code = 401
    openai_type = "invalid_request_error"
    anthropic_type = "authentication_error"
    default_code = "invalid_api_key"


class Forbidden(BatchdError):
    """The key is valid but its role does not allow this (the console's operator views)."""

    status_code = 403
    openai_type = "permission_error"
    anthropic_type = "permission_error"
    default_code = "insufficient_permissions"


class NotFound(BatchdError):
    status_code = 404
    openai_type = "invalid_request_error"
    anthropic_type = "not_found_error"


class ModelNotFound(NotFound):
    default_code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model[:200]}' does not exist or you do not have access to it.",
            param="model",
        )


class Conflict(BatchdError):
    status_code = 400
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"


class IdempotencyConflict(Conflict):
    status_code = 409
    default_code = "idempotency_key_conflict"


class IdempotencyKeyTaken(Exception):
    """Raised by the store when a create's Idempotency-Key was recorded by another create
    first: the whole create rolled back; the caller answers with the other one's object."""


class PayloadTooLarge(BatchdError):
    status_code = 413
    openai_type = "invalid_request_error"
    anthropic_type = "request_too_large"
    default_code = "request_too_large"


class RequestTimeout(BatchdError):
    status_code = 408
    openai_type = "invalid_request_error"
    anthropic_type = "timeout_error"
    default_code = "request_timeout"


class LimitExceeded(BatchdError):
    status_code = 429
    openai_type = "requests"
    anthropic_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int = 1, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class EngineError(BatchdError):
    status_code = 500


class StartupError(BatchdError):
    pass


class ConfigError(StartupError):
    pass


class DatabaseUrlError(StartupError):
    pass


class BlobUrlError(StartupError):
    pass


class DataDirLocked(StartupError):
    pass


class InsecureBind(StartupError):
    pass


class NeedsSharedDatabase(StartupError):
    pass


_ANTHROPIC_TYPES_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


class UpstreamError(BatchdError):
    """An upstream server's final error answer, kept with its status and body."""

    def __init__(self, status_code: int, body: bytes, *, attempts: int = 1) -> None:
        message = f"The upstream server answered {status_code}."
        openai_type = "server_error" if status_code >= 500 else "invalid_request_error"
        param: str | None = None
        code: str | None = None
        try:
            error = orjson.loads(body).get("error")
        except (orjson.JSONDecodeError, AttributeError):
            error = None
        if isinstance(error, dict):
            if isinstance(error.get("message"), str):
                message = f"The upstream server answered {status_code}: {error['message']}"
            kind, where = error.get("type"), error.get("param")
            openai_type = kind if isinstance(kind, str) else openai_type
            param = where if isinstance(where, str) else None
            code = str(error["code"]) if error.get("code") is not None else None
        elif body:
            text = body[:500].decode("utf-8", "replace")
            message = f"The upstream server answered {status_code}: {text}"
        super().__init__(message, param=param, code=code)
        self.status_code = status_code
        self.openai_type = openai_type
        self.anthropic_type = _ANTHROPIC_TYPES_BY_STATUS.get(
            status_code, "api_error" if status_code >= 500 else "invalid_request_error"
        )
        self.body = body
        self.attempts = attempts  # HTTP attempts it took to get this answer
