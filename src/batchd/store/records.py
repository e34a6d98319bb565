"""Plain values read from the store (no SQLAlchemy rows leak past the store)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class BatchStatus(enum.StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_BATCH_STATUSES


TERMINAL_BATCH_STATUSES = frozenset(
    {BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)


class RequestState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    ERRORED = "errored"
    CANCELED = "canceled"
    EXPIRED = "expired"


FINAL_REQUEST_STATES = (
    RequestState.SUCCEEDED,
    RequestState.ERRORED,
    RequestState.CANCELED,
    RequestState.EXPIRED,
)


@dataclass(frozen=True, slots=True)
class RequestLine:
    """One request row to insert: a line of an OpenAI batch file, or one request of an
    Anthropic message batch."""

    line_no: int
    custom_id: str
    body: bytes  # the request's body object re-serialized (compact JSON)
    model: str
    prefix_key: str  # rows sharing a prompt prefix lease together (see queue.py)


@dataclass(frozen=True, slots=True)
class FileRecord:
    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    expires_at: int | None
    blob: str


@dataclass(slots=True)
class RequestCounts:
    pending: int = 0
    running: int = 0
    succeeded: int = 0
    errored: int = 0
    canceled: int = 0
    expired: int = 0

    @property
    def total(self) -> int:
        return (
            self.pending
            + self.running
            + self.succeeded
            + self.errored
            + self.canceled
            + self.expired
        )

    @property
    def unfinished(self) -> int:
        return self.pending + self.running


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0


@dataclass(slots=True)
class BatchRecord:
    id: str
    tenant: str
    surface: str
    endpoint: str
    input_file_id: str | None
    completion_window: str
    status: BatchStatus
    model: str | None
    errors: list[dict[str, Any]] | None
    metadata: dict[str, str] | None
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    archived_at: int | None = None
    output_expires_after: int | None = None  # seconds; None: the server's file retention
    counts: RequestCounts = field(default_factory=RequestCounts)
    usage: Usage = field(default_factory=Usage)

    @property
    def ended_at(self) -> int | None:
        """When the batch ended, however it ended (at most one of these is ever set)."""
        for stamp in (self.completed_at, self.failed_at, self.expired_at, self.cancelled_at):
            if stamp is not None:
                return stamp
        return None


@dataclass(frozen=True, slots=True)
class LeasedRequest:
    seq: int
    batch_id: str
    line_no: int
    custom_id: str
    body: bytes
    epoch: int
    endpoint: str
    expires_at: int | None = None  # the batch's deadline: retrying past it is pointless
    upstream_attempts: int = 0  # upstream HTTP attempts made under earlier leases
    tenant: str = ""  # the batch's owner: finished work counts toward its fair share


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    state: RequestState
    status_code: int | None
    result: bytes  # JSON: the response body, or for not-executed rows the error object
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    upstream_attempts: int = 0  # in all, earlier leases included (0: not run upstream)


@dataclass(frozen=True, slots=True)
class FinishedRow:
    line_no: int
    custom_id: str
    state: RequestState
    status_code: int | None
    result: bytes | None


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """A client's ``Idempotency-Key`` for one create, written in the same transaction as the
    object it names: a crash leaves either both or neither, never a key with no object."""

    tenant: str
    scope: str  # which create: "files", "batches", "message_batches"
    key: str
    fingerprint: str  # sha256 of the request's content
    ttl_seconds: int  # an older row with this key is forgotten, and the key free again


@dataclass(frozen=True, slots=True)
class EarlierCreate:
    """The object an earlier request with the same idempotency key created."""

    fingerprint: str
    object_id: str
    created_at: int
