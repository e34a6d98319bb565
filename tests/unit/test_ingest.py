from __future__ import annotations

import io
import json

from batchd.protocol import batch_file as ingest

ENDPOINT = "/v1/chat/completions"


def line(custom_id: str, **overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": ENDPOINT,
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }
    base.update(overrides)
    return base


def run(data: bytes, **limits: int) -> ingest.ValidationReport:
    return ingest.validate(
        io.BytesIO(data),
        ENDPOINT,
        max_lines=limits.get("max_lines", 100),
        max_line_bytes=limits.get("max_line_bytes", 10_000),
        max_errors=limits.get("max_errors", 100),
    )


def encode(*lines: dict[str, object]) -> bytes:
    return b"\n".join(json.dumps(x).encode() for x in lines)


def test_valid_file_with_bom_crlf_and_blank_lines() -> None:
    data = b"\xef\xbb\xbf" + encode(line("a")) + b"\r\n\r\n" + encode(line("b")) + b"\r\n"
    report = run(data)
    assert report.ok, report.errors
    assert report.request_count == 2
    rows = list(ingest.iter_requests(io.BytesIO(data), ENDPOINT, max_line_bytes=10_000))
    assert [(r.line_no, r.custom_id) for r in rows] == [(1, "a"), (3, "b")]


def test_each_problem_is_reported_with_its_line() -> None:
    data = b"\n".join(
        [
            encode(line("a")),
            b"{nope",
            encode(line("a")),
            encode(line("c", url="/v1/completions")),
            encode(line("d", body={"model": "m", "stream": True})),
            encode(line("e", body={"messages": []})),
            b'{"custom_id": "f", "method": "POST", "url": "/v1/chat/completions", "body": NaN}',
            b"\xff\xfe not utf-8",
        ]
    )
    report = run(data)
    assert [(e.line, e.code) for e in report.errors] == [
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "invalid_url"),
        (5, "streaming_unsupported"),
        (6, "invalid_request"),
        (7, "invalid_json_line"),
        (8, "invalid_json_line"),
    ]


def test_limits() -> None:
    assert run(b"").errors[0].code == "empty_batch"
    assert run(b"\n\n").errors[0].code == "empty_batch"
    many = encode(*(line(str(i)) for i in range(5)))
    assert run(many, max_lines=4).errors[0].code == "too_many_tasks"
    long_line = encode(line("x", body={"model": "m", "pad": "p" * 5000}))
    report = run(long_line + b"\n" + encode(line("y")), max_line_bytes=1000)
    assert [(e.line, e.code) for e in report.errors] == [(1, "line_too_large")]
    assert report.request_count == 1
    errors = run(b"x\n" * 50, max_errors=10)
    assert len(errors.errors) == 10 and errors.truncated


class CountingStream(io.BytesIO):
    """Records the largest single read, to prove the file is never read whole."""

    largest_read = 0

    def readline(self, size: int | None = -1) -> bytes:  # type: ignore[override]
        data = super().readline(size)
        self.largest_read = max(self.largest_read, len(data))
        return data

    def read(self, size: int | None = -1) -> bytes:
        raise AssertionError("validation must not read() the whole file")


def test_validation_streams_line_by_line() -> None:
    data = encode(*(line(f"id-{i}") for i in range(10_000)))
    stream = CountingStream(data)
    report = ingest.validate(
        stream, ENDPOINT, max_lines=50_000, max_line_bytes=10_000, max_errors=10
    )
    assert report.ok and report.request_count == 10_000
    assert stream.largest_read < 200  # one line at a time, of a ~1.4 MB file


def test_prefix_key_groups_shared_system_prompts() -> None:
    def keyed(system: str, user: str) -> str:
        body = {
            "model": "m",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        }
        data = encode(line("x", body=body))
        return next(
            ingest.iter_requests(io.BytesIO(data), ENDPOINT, max_line_bytes=10_000)
        ).prefix_key

    assert keyed("S", "one") == keyed("S", "two")
    assert keyed("S", "one") != keyed("T", "one")


def test_prefix_key_groups_responses_lines_by_instructions_and_earlier_items() -> None:
    def key(instructions: str | None, *items: str) -> str:
        body: dict[str, object] = {
            "model": "m",
            "input": [{"role": "user", "content": text} for text in items],
        }
        if instructions is not None:
            body["instructions"] = instructions
        return ingest.prefix_key("m", body)

    assert key("S", "a", "one") == key("S", "a", "two")
    assert key("S", "a", "one") != key("T", "a", "one")
    assert key("S", "a", "one") != key("S", "b", "one")
    assert key(None, "one") != key("S", "one")
    # A string input with instructions is keyed by the instructions.
    assert ingest.prefix_key("m", {"instructions": "S", "input": "x"}) == ingest.prefix_key(
        "m", {"instructions": "S", "input": "y"}
    )
    assert key("S", "one") == ingest.prefix_key("m", {"instructions": "S", "input": "x"})
    # An embeddings body's input list is not read as a conversation.
    assert ingest.prefix_key("m", {"input": ["a", "b"]}) == ingest.prefix_key("m", {"input": "c"})
