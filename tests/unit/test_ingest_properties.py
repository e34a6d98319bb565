"""Property tests of the streaming JSONL validator (``batchd.protocol.batch_file``) with hypothesis.

Two promises: whatever bytes a client uploads, validation ends in a report (never an
exception), with only documented error codes and line numbers inside the file; and a file
made of valid request lines, however it is laid out (LF or CRLF, a BOM, blank lines, a final
newline or none), validates with every request counted and read back in order. The example
budgets are fixed and derandomized: the same cases on every run, in a few seconds.
"""

from __future__ import annotations

import io
import json
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchd.protocol import batch_file as ingest
from batchd.protocol.openai.bodies import SUPPORTED_BATCH_ENDPOINTS

# The codes docs/compatibility.md documents for validation errors.
DOCUMENTED_CODES = {
    "invalid_json_line",
    "missing_required_parameter",
    "invalid_request",
    "duplicate_custom_id",
    "invalid_url",
    "streaming_unsupported",
    "line_too_large",
    "too_many_tasks",
    "empty_batch",
}
BOM = b"\xef\xbb\xbf"
BIG_LINE_LIMIT = 1 << 20

PROPERTY = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Text a JSON document can carry: any code point but the lone surrogates UTF-8 cannot encode.
text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
nonempty_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40)
# A valid custom_id: any text but NUL, which no text column can store (refused by design).
custom_id_text = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
    min_size=1,
    max_size=40,
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
)
blank_lines = st.sampled_from([b"", b" ", b"\t", b" \t  "])
terminators = st.sampled_from([b"\n", b"\r\n"])


def run_validate(data: bytes, endpoint: str, **limits: int) -> ingest.ValidationReport:
    return ingest.validate(
        io.BytesIO(data),
        endpoint,
        max_lines=limits.get("max_lines", 10_000),
        max_line_bytes=limits.get("max_line_bytes", BIG_LINE_LIMIT),
        max_errors=limits.get("max_errors", 100),
    )


def check_report(report: ingest.ValidationReport, data: bytes, max_errors: int) -> None:
    """What every report must satisfy, whatever the input."""
    physical_lines = data.count(b"\n") + 1
    assert report.request_count >= 0
    # Up to max_errors line errors, plus one file-level error (too_many_tasks or empty_batch).
    assert len(report.errors) <= max_errors + 1
    for error in report.errors:
        assert error.code in DOCUMENTED_CODES, error
        assert isinstance(error.message, str) and error.message
        assert error.line is None or 1 <= error.line <= physical_lines, (error, physical_lines)
        orjson.dumps(error.to_wire())  # it goes into the batch object as it is
    assert report.ok == (not report.errors)
    if report.ok:
        assert report.request_count >= 1
    assert len(report.models) <= report.request_count


def check_iter_requests(data: bytes, endpoint: str, report: ingest.ValidationReport) -> None:
    """Pass two agrees with pass one: a clean file yields exactly its requests; any other file
    yields or refuses with ValueError, never anything else."""
    stream = io.BytesIO(data)
    if report.ok:
        rows = list(ingest.iter_requests(stream, endpoint, max_line_bytes=BIG_LINE_LIMIT))
        assert len(rows) == report.request_count
        assert sorted({r.model for r in rows}) == sorted(report.models)
        return
    try:
        for row in ingest.iter_requests(stream, endpoint, max_line_bytes=BIG_LINE_LIMIT):
            assert row.custom_id
    except ValueError:
        pass


# ------------------------------------------------------------------------- no crash


@PROPERTY
@given(
    data=st.binary(max_size=3000),
    endpoint=st.sampled_from(SUPPORTED_BATCH_ENDPOINTS),
    max_line_bytes=st.integers(1, 2048),
    max_lines=st.integers(1, 50),
    max_errors=st.integers(1, 20),
)
def test_any_bytes_end_in_a_report(
    data: bytes, endpoint: str, max_line_bytes: int, max_lines: int, max_errors: int
) -> None:
    report = run_validate(
        data, endpoint, max_line_bytes=max_line_bytes, max_lines=max_lines, max_errors=max_errors
    )
    check_report(report, data, max_errors)


def _request_like(endpoint: str) -> st.SearchStrategy[Any]:
    """Lines that get past JSON parsing and probe each field check: right and wrong keys,
    types and values, arbitrary bodies."""
    return st.fixed_dictionaries(
        {},
        optional={
            "custom_id": nonempty_text | json_values,
            "method": st.sampled_from(["POST", "GET", "post"]) | json_values,
            "url": st.sampled_from([endpoint, *SUPPORTED_BATCH_ENDPOINTS, "/v1/x"]) | json_values,
            "body": st.fixed_dictionaries(
                {},
                optional={
                    "model": nonempty_text | json_values,
                    "messages": json_values,
                    "prompt": json_values,
                    "stream": json_values,
                },
            )
            | json_values,
        },
    )


def _line_bytes(endpoint: str) -> st.SearchStrategy[bytes]:
    return st.one_of(
        _request_like(endpoint).map(orjson.dumps),
        json_values.map(orjson.dumps),
        st.binary(max_size=80),
        # JSON nested deeper than any serializer's recursion limit.
        st.integers(1, 1500).map(
            lambda depth: (
                b'{"custom_id": "deep", "method": "POST", "url": "'
                + endpoint.encode()
                + b'", "body": {"model": "m", "x": '
                + b"[" * depth
                + b"]" * depth
                + b"}}"
            )
        ),
    )


@st.composite
def messy_files(draw: st.DrawFn) -> tuple[str, bytes]:
    endpoint = draw(st.sampled_from(SUPPORTED_BATCH_ENDPOINTS))
    lines = draw(st.lists(_line_bytes(endpoint) | blank_lines, max_size=12))
    data = b"".join(line + draw(terminators) for line in lines)
    if draw(st.booleans()):
        data = BOM + data
    if draw(st.booleans()):
        data = data.rstrip(b"\r\n")
    return endpoint, data


@PROPERTY
@given(file=messy_files(), max_errors=st.integers(1, 5))
def test_json_lines_of_any_shape_end_in_a_report(file: tuple[str, bytes], max_errors: int) -> None:
    endpoint, data = file
    report = run_validate(data, endpoint, max_errors=max_errors)
    check_report(report, data, max_errors)
    check_iter_requests(data, endpoint, report)


# --------------------------------------------------------------------- valid files


def _body(endpoint: str, model: str, content: str, max_tokens: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model}
    if endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": content}]
    else:
        body["prompt"] = content
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


@st.composite
def valid_files(draw: st.DrawFn) -> tuple[str, bytes, list[tuple[int, str, dict[str, Any]]]]:
    """(endpoint, file bytes, [(physical line number, custom_id, body)] in file order)."""
    endpoint = draw(st.sampled_from(SUPPORTED_BATCH_ENDPOINTS))
    custom_ids = draw(st.lists(custom_id_text, min_size=1, max_size=25, unique=True))
    models = draw(st.lists(nonempty_text, min_size=1, max_size=3))
    expected: list[tuple[int, str, dict[str, Any]]] = []
    parts: list[bytes] = []
    line_no = 0
    for custom_id in custom_ids:
        for blank in draw(st.lists(blank_lines, max_size=2)):
            parts.append(blank + draw(terminators))
            line_no += 1
        body = _body(
            endpoint,
            draw(st.sampled_from(models)),
            draw(text),
            draw(st.none() | st.integers(1, 4096)),
        )
        line = {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body}
        if draw(st.booleans()):
            line["body"]["stream"] = False  # explicitly off is allowed
        encoded = json.dumps(line, ensure_ascii=draw(st.booleans())).encode()
        parts.append(encoded + draw(terminators))
        line_no += 1
        expected.append((line_no, custom_id, line["body"]))
    for blank in draw(st.lists(blank_lines, max_size=2)):
        parts.append(blank + draw(terminators))
    data = b"".join(parts)
    if draw(st.booleans()):
        data = data.rstrip(b"\r\n")  # no newline after the last line
    if draw(st.booleans()):
        data = BOM + data
    return endpoint, data, expected


@PROPERTY
@given(file=valid_files())
def test_valid_lines_validate_and_read_back_in_order(
    file: tuple[str, bytes, list[tuple[int, str, dict[str, Any]]]],
) -> None:
    endpoint, data, expected = file
    report = run_validate(data, endpoint)
    assert report.ok, report.errors
    assert report.request_count == len(expected)
    first_seen = list(dict.fromkeys(body["model"] for _, _, body in expected))
    assert report.models == first_seen
    rows = list(ingest.iter_requests(io.BytesIO(data), endpoint, max_line_bytes=BIG_LINE_LIMIT))
    assert [(r.line_no, r.custom_id) for r in rows] == [(n, cid) for n, cid, _ in expected]
    for row, (_, _, body) in zip(rows, expected, strict=True):
        assert orjson.loads(row.body) == body
        assert row.model == body["model"]


@PROPERTY
@given(file=valid_files(), data=st.data())
def test_a_repeated_custom_id_is_reported_on_its_own_line(
    file: tuple[str, bytes, list[tuple[int, str, dict[str, Any]]]], data: st.DataObject
) -> None:
    endpoint, content, expected = file
    _, repeated, _ = data.draw(st.sampled_from(expected))
    duplicate = {
        "custom_id": repeated,
        "method": "POST",
        "url": endpoint,
        "body": _body(endpoint, "m", "again", None),
    }
    content = content.rstrip(b"\r\n") + b"\n" + json.dumps(duplicate).encode() + b"\n"
    report = run_validate(content, endpoint)
    duplicate_line = content.rstrip(b"\n").count(b"\n") + 1
    assert [(e.code, e.line) for e in report.errors] == [("duplicate_custom_id", duplicate_line)]
    assert report.request_count == len(expected)


@PROPERTY
@given(
    file=valid_files(),
    data=st.data(),
    max_line_bytes=st.integers(256, 2048),
)
def test_an_oversized_line_is_reported_and_the_rest_still_counted(
    file: tuple[str, bytes, list[tuple[int, str, dict[str, Any]]]],
    data: st.DataObject,
    max_line_bytes: int,
) -> None:
    endpoint, content, expected = file
    lines = content.split(b"\n")
    # Above every real line, so that only the victim can be too long.
    limit = max(max_line_bytes, *(len(line) + 8 for line in lines))
    # Replace one request line by one far beyond the limit; everything else stays put.
    victim, _, _ = data.draw(st.sampled_from(expected))
    oversized = b'{"custom_id": "' + b"x" * (limit * 3) + b'"}'
    lines[victim - 1] = oversized + (b"\r" if lines[victim - 1].endswith(b"\r") else b"")
    mutated = b"\n".join(lines)
    report = run_validate(mutated, endpoint, max_line_bytes=limit)
    line_codes = [(e.code, e.line) for e in report.errors]
    assert ("line_too_large", victim) in line_codes, line_codes
    # Only the victim is lost; every other line keeps its number and is counted.
    assert [e for e in report.errors if e.line != victim] == []
    assert report.request_count == len(expected) - 1
