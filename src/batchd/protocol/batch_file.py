"""Streaming validation of an OpenAI batch input file.

The file is read line by line with a bounded line length; only the set of ``custom_id``s seen
so far is kept (duplicates must be found), never the parsed lines. Pass one (``validate``)
collects every structural problem with its line number; pass two (``iter_requests``) yields the
rows to insert, again streaming, once the file is known to be clean.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from batchd.protocol.jsonstrict import duplicate_key, nesting_depth
from batchd.protocol.openai.bodies import SUPPORTED_BATCH_ENDPOINTS, routing_field
from batchd.store.records import RequestLine as RequestLine  # the rows this yields

_BOM = b"\xef\xbb\xbf"
_SKIP_CHUNK_BYTES = 1024 * 1024
PARSER_MAX_DEPTH = 1024  # orjson refuses input nested deeper than this


@dataclass(frozen=True, slots=True)
class LineError:
    code: str
    message: str
    line: int | None
    param: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(slots=True)
class ValidationReport:
    errors: list[LineError] = field(default_factory=list)
    request_count: int = 0
    models: list[str] = field(default_factory=list)
    truncated: bool = False  # more errors existed than were kept

    @property
    def ok(self) -> bool:
        return not self.errors


def _read_lines(stream: IO[bytes], max_line_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """Yield (line_no, raw line without newline, its length in bytes); the line is None when
    it is longer than ``max_line_bytes`` (its length is then counted while skipping it)."""
    line_no = 0
    first = True
    while True:
        raw = stream.readline(max_line_bytes + 1)
        if not raw:
            return
        line_no += 1
        if first:
            first = False
            if raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            # Skip the rest of the oversized line without holding it in memory.
            length = len(raw)
            while True:
                rest = stream.readline(_SKIP_CHUNK_BYTES)
                length += len(rest)
                if not rest or rest.endswith(b"\n"):
                    break
            ending = b"\r\n" if rest.endswith(b"\r\n") else b"\n" if rest.endswith(b"\n") else b""
            yield line_no, None, length - len(ending)
            continue
        line = raw.rstrip(b"\r\n")
        yield line_no, line, len(line)


def prefix_key(model: str, body: dict[str, Any]) -> str:
    # Requests that share everything but their final turn (typically a system prompt and
    # few-shot examples) get the same key, so the scheduler can lease them together.
    messages = body.get("messages")
    # A Responses body: its instructions and its input items but the last (an embeddings
    # body's input, a list of strings or token ids, is no conversation).
    items = body.get("input")
    items = items if isinstance(items, list) and all(isinstance(i, dict) for i in items) else []
    if isinstance(messages, list):
        shared: Any = messages[:-1]
    elif items or isinstance(body.get("instructions"), str):
        shared = [body.get("instructions"), items[:-1]]
    else:
        prompt = body.get("prompt")
        shared = prompt[:256] if isinstance(prompt, str) else None
    digest = hashlib.blake2b(orjson.dumps([model, shared]), digest_size=8).hexdigest()
    return digest


def _depth_error(line_no: int, depth: str, max_depth: int | None) -> LineError:
    limit = (
        f"the limit is {max_depth} levels (max_json_depth)"
        if max_depth is not None
        else f"the parser's limit is {PARSER_MAX_DEPTH} levels"
    )
    return LineError(
        "invalid_json_line",
        f"This line is not parseable as valid JSON: it is nested too deeply, {depth} levels;"
        f" {limit}.",
        line_no,
    )


def _check_line(
    line_no: int, raw: bytes, endpoint: str, *, strict: bool = True, max_depth: int | None = None
) -> tuple[RequestLine | None, LineError | None]:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            return None, _depth_error(line_no, f"more than {PARSER_MAX_DEPTH}", max_depth)
        return None, LineError(
            "invalid_json_line",
            f"This line is not parseable as valid JSON: {str(exc)[:200]}.",
            line_no,
        )
    # A line cannot nest deeper than it has brackets: most lines skip the walk.
    if max_depth is not None and raw.count(b"[") + raw.count(b"{") > max_depth:
        depth = nesting_depth(obj)
        if depth > max_depth:
            return None, _depth_error(line_no, str(depth), max_depth)
    if not isinstance(obj, dict):
        return None, LineError("invalid_json_line", "Each line must be a JSON object.", line_no)
    for key in ("custom_id", "method", "url", "body"):
        if key not in obj:
            return None, LineError(
                "missing_required_parameter", f"Missing required parameter: '{key}'.", line_no, key
            )
    custom_id = obj["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        return None, LineError(
            "invalid_request", "'custom_id' must be a non-empty string.", line_no, "custom_id"
        )
    if "\x00" in custom_id:
        # Echoed byte-for-byte otherwise, but no text column (PostgreSQL's least) stores NUL.
        return None, LineError(
            "invalid_request", "'custom_id' must not contain NUL characters.", line_no, "custom_id"
        )
    duplicated = duplicate_key(raw) if strict else None
    if duplicated is not None:
        return None, LineError(
            "invalid_json_line",
            f"This line names the key {duplicated[:100]!r} twice in one object; which value"
            " was meant is ambiguous.",
            line_no,
        )
    if obj["method"] != "POST":
        return None, LineError(
            "invalid_request", "Only the 'POST' method is supported.", line_no, "method"
        )
    if obj["url"] != endpoint:
        return None, LineError(
            "invalid_url",
            f"The url {str(obj['url'])[:200]!r} does not match the batch's endpoint {endpoint!r}.",
            line_no,
            "url",
        )
    body = obj["body"]
    if not isinstance(body, dict):
        return None, LineError("invalid_request", "'body' must be a JSON object.", line_no, "body")
    routing = routing_field(body)
    if routing is not None:
        return None, LineError(
            "invalid_request",
            f"'body.{routing}' is not allowed: a request cannot choose the server it is sent to"
            " or its credentials.",
            line_no,
            f"body.{routing}",
        )
    if body.get("stream") is True:
        return None, LineError(
            "streaming_unsupported",
            "Streaming is not supported inside a batch; remove 'stream' or set it to false.",
            line_no,
            "body.stream",
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return None, LineError(
            "invalid_request", "'body.model' must be a non-empty string.", line_no, "body.model"
        )
    try:
        request = RequestLine(
            line_no=line_no,
            custom_id=custom_id,
            body=orjson.dumps(body),
            model=model,
            prefix_key=prefix_key(model, body),
        )
    except orjson.JSONEncodeError:
        # orjson parses 1,024 levels of nesting but serializes only 254: a body between the
        # two would otherwise crash validation (and be retried forever).
        return None, LineError("invalid_request", "'body' is nested too deeply.", line_no, "body")
    return request, None


def _scan(
    stream: IO[bytes],
    endpoint: str,
    max_line_bytes: int,
    *,
    strict: bool = True,
    max_depth: int | None = None,
) -> Iterator[tuple[RequestLine | None, LineError | None]]:
    seen: set[str] = set()
    for line_no, raw, length in _read_lines(stream, max_line_bytes):
        if raw is None:
            yield (
                None,
                LineError(
                    "line_too_large",
                    f"Line {line_no} is {length} bytes long; the limit is {max_line_bytes}"
                    " bytes per line (max_line_bytes).",
                    line_no,
                ),
            )
            continue
        if not raw.strip():
            continue  # blank lines (including a trailing one) carry no request
        request, error = _check_line(line_no, raw, endpoint, strict=strict, max_depth=max_depth)
        if request is not None:
            if request.custom_id in seen:
                error = LineError(
                    "duplicate_custom_id",
                    f"The custom_id {request.custom_id[:200]!r} is used by an earlier line.",
                    line_no,
                    "custom_id",
                )
                request = None
            else:
                seen.add(request.custom_id)
        yield request, error


def validate(
    stream: IO[bytes],
    endpoint: str,
    *,
    max_lines: int,
    max_line_bytes: int,
    max_errors: int,
    max_depth: int | None = None,
) -> ValidationReport:
    """Check every line. ``max_depth``: lines nested deeper are errors (None: only the
    parser's own limit applies)."""
    report = ValidationReport()
    if endpoint not in SUPPORTED_BATCH_ENDPOINTS:
        report.errors.append(
            LineError("invalid_request", f"Endpoint {endpoint} is not supported.", None, "endpoint")
        )
        return report
    models: dict[str, None] = {}
    for request, error in _scan(stream, endpoint, max_line_bytes, max_depth=max_depth):
        if error is not None:
            if len(report.errors) < max_errors:
                report.errors.append(error)
            else:
                report.truncated = True
            continue
        assert request is not None
        report.request_count += 1
        models.setdefault(request.model)
    report.models = list(models)
    if report.request_count > max_lines:
        report.errors.insert(
            0,
            LineError(
                "too_many_tasks",
                f"The file has {report.request_count} requests; the limit is {max_lines}"
                " requests per batch (max_batch_lines).",
                None,
            ),
        )
    if report.request_count == 0 and not report.errors:
        report.errors.append(LineError("empty_batch", "The input file has no requests.", None))
    return report


def iter_requests(
    stream: IO[bytes], endpoint: str, *, max_line_bytes: int
) -> Iterator[RequestLine]:
    """Yield the requests of a file that ``validate`` accepted. Blobs never change, so the
    duplicate-key pass (half the cost of a line) is not repeated."""
    for request, error in _scan(stream, endpoint, max_line_bytes, strict=False):
        if error is not None:  # the file changed under us; refuse rather than guess
            raise ValueError(f"line {error.line}: {error.message}")
        assert request is not None
        yield request
