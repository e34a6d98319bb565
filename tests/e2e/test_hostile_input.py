"""Hostile and malformed input against a real server, on both surfaces.

Every case must be answered with a 4xx in the wire shape of the surface it came in on (or,
for a bad line inside a batch file, with the batch failing and naming the line), must write
nothing outside the data dir, and must leave the server serving. A bystander tenant's batch
runs through all of it and is checked last: nobody else's work may be lost.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.support.helpers import chat_line, jsonl, read_jsonl, upload, wait_for
from tests.support.serverproc import ServerProcess, running_server

KEY, BYSTANDER_KEY = "hostile-key-0001", "bystander-key-01"
WRONG_KEY = "presented-but-wrong-key-0001"  # sent by the last test; must never be logged
IDLE_TIMEOUT_SECONDS = 3
BYSTANDER_REQUESTS = 150
TERMINAL = ("completed", "failed", "expired", "cancelled")
# The bystander's status as each hostile test began.
BYSTANDER_SEEN: list[str] = []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("hostile")
    with running_server(
        data_dir,
        BATCHD_API_KEYS=f"{KEY},{BYSTANDER_KEY}",
        BATCHD_BODY_IDLE_TIMEOUT_SECONDS=str(IDLE_TIMEOUT_SECONDS),
    ) as srv:
        yield srv


@dataclass(frozen=True)
class Bystander:
    batch_id: str
    input_file_id: str


def bystander_client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_base_url, api_key=BYSTANDER_KEY, max_retries=0)


@pytest.fixture(scope="module")
def bystander(server: ServerProcess) -> Bystander:
    """Another tenant's batch, started before any hostile input arrives and long enough to
    run through all of it. Its deadline is later than any hostile batch's, so their rows are
    leased first and it fills the engine in between: it overlaps the hostile input without
    holding up the tests that wait on their batches."""
    client = bystander_client(server)
    lines = [chat_line(f"b{i}", f"Count to {i}.", max_tokens=8) for i in range(BYSTANDER_REQUESTS)]
    file_id = upload(client, lines)
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="7d"
    )
    return Bystander(batch.id, file_id)


@pytest.fixture(autouse=True)
def _watch_bystander(server: ServerProcess, bystander: Bystander) -> None:
    BYSTANDER_SEEN.append(bystander_client(server).batches.retrieve(bystander.batch_id).status)


@pytest.fixture()
def client(server: ServerProcess, bystander: Bystander) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_base_url, api_key=KEY, max_retries=0)


@pytest.fixture()
def claude(server: ServerProcess, bystander: Bystander) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)


@pytest.fixture()
def http(server: ServerProcess, bystander: Bystander) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as raw:
        yield raw


def openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert set(error) >= {"message", "type", "param", "code"}
    return dict(error)


def anthropic_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert body["type"] == "error"
    assert isinstance(body["error"]["type"], str) and body["error"]["message"]
    return dict(body["error"])


def still_serving(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    listed = httpx.get(
        f"{server.url}/v1/batches", headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    )
    assert listed.status_code == 200
    assert listed.headers["x-request-id"].startswith("req_")


def run_file(client: openai.OpenAI, content: bytes) -> Any:
    file_id = client.files.create(file=("input.jsonl", content), purpose="batch").id
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return wait_for(client, batch.id)


def line(custom_id: str = "a", **body: Any) -> bytes:
    return json.dumps(chat_line(custom_id, "Hi", max_tokens=2, **body)).encode()


# ------------------------------------------------------------------ batch input files


@pytest.mark.parametrize(
    ("content", "bad_line", "needle"),
    [
        pytest.param(line("a") + b"\n" + line("b")[:40], 2, "valid JSON", id="truncated-last-line"),
        pytest.param(
            line("a") + b"\n" + line("b").replace(b'"Hi"', b'"\xff\xfe"'),
            2,
            "valid JSON",
            id="invalid-utf8",
        ),
        pytest.param(
            line("a") + b"\n" + line("b").replace(b'"temperature": 0', b'"temperature": NaN'),
            2,
            "valid JSON",
            id="nan-literal",
        ),
        pytest.param(
            line("a").replace(b'"temperature": 0', b'"temperature": -Infinity'),
            1,
            "valid JSON",
            id="infinity-literal",
        ),
        pytest.param(
            line("a")[:-1] + b', "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
            1,
            "nested too deeply",
            id="10000-deep",
        ),
        pytest.param(
            line("a").replace(b'"custom_id": "a"', b'"custom_id": "a", "custom_id": "b"'),
            1,
            "twice",
            id="duplicate-keys",
        ),
        pytest.param(
            line("a").replace(b'"model": "default"', b'"model": "x", "model": "default"'),
            1,
            "twice",
            id="duplicate-keys-in-body",
        ),
        pytest.param(line("a\x00b"), 1, "NUL", id="nul-in-custom-id"),
        pytest.param(line("a") + b"\n\x00\x00\n" + line("b"), 2, "valid JSON", id="raw-nul-line"),
    ],
)
def test_a_bad_line_fails_the_batch_and_names_the_line(
    client: openai.OpenAI, content: bytes, bad_line: int, needle: str
) -> None:
    batch = run_file(client, content + b"\n")
    assert batch.status == "failed", batch
    errors = batch.errors.data
    assert [e.line for e in errors] == [bad_line], errors
    assert needle in errors[0].message, errors[0].message


def test_a_truncated_last_line_without_a_final_newline(client: openai.OpenAI) -> None:
    """The upload simply stops mid-line: no newline ends the file."""
    content = line("a") + b"\n" + line("b")[:40]
    assert not content.endswith(b"\n")
    batch = run_file(client, content)
    assert batch.status == "failed", batch
    (error,) = batch.errors.data
    assert error.line == 2 and error.code == "invalid_json_line", error
    assert "valid JSON" in error.message, error
    assert batch.request_counts.total == 0  # the good first line did not run either


def test_bom_crlf_and_blank_lines_are_accepted(client: openai.OpenAI) -> None:
    content = b"\xef\xbb\xbf" + line("a") + b"\r\n\r\n   \r\n" + line("b") + b"\r\n\r\n"
    batch = run_file(client, content)
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == 2


def test_a_50_mb_line_is_refused_by_its_length(client: openai.OpenAI) -> None:
    huge = line("a")[:-1] + b', "padding": "' + b"x" * (50 * 1024 * 1024) + b'"}'
    batch = run_file(client, line("ok") + b"\n" + huge + b"\n")
    assert batch.status == "failed"
    (error,) = batch.errors.data
    assert error.line == 2
    assert "bytes" in error.message  # names the limit


def test_strange_but_legal_custom_ids_round_trip_byte_for_byte(client: openai.OpenAI) -> None:
    ids = [
        "../../../etc/passwd",
        "'; DROP TABLE requests; --",
        '" OR 1=1 --',
        "a",
        "\uff41",  # fullwidth a: a look-alike, yet a different id
        "e\u0301",  # e + combining acute (NFD) ...
        "\u00e9",  # ... and precomposed é (NFC): distinct, never normalized into a duplicate
        "\u0430",  # Cyrillic a
        "%2e%2e%2f",
        "\u202e\u0645\u0631\u062d\u0628\u0627",  # right-to-left override
    ]
    content = b"\n".join(line(custom_id) for custom_id in ids) + b"\n"
    batch = run_file(client, content)
    assert batch.status == "completed", batch
    results = read_jsonl(client, batch.output_file_id)
    assert sorted(r["custom_id"] for r in results) == sorted(ids)


def test_look_alike_model_name_is_a_per_request_not_found(client: openai.OpenAI) -> None:
    content = line("real") + b"\n" + line("fake", model="d\u0435fault") + b"\n"  # Cyrillic e
    batch = run_file(client, content)
    assert batch.status == "completed"
    (failed,) = read_jsonl(client, batch.error_file_id)
    assert failed["custom_id"] == "fake"
    assert failed["response"]["status_code"] == 404
    assert failed["response"]["body"]["error"]["code"] == "model_not_found"
    assert [r["custom_id"] for r in read_jsonl(client, batch.output_file_id)] == ["real"]


# ---------------------------------------------- engine parameters, rejected before the engine

OUT_OF_RANGE: list[tuple[str, dict[str, Any], str]] = [
    ("n-million", {"n": 1_000_000}, "n"),
    ("max-tokens-2^31", {"max_tokens": 2**31}, "max_tokens"),
    ("max-tokens-negative", {"max_tokens": -5}, "max_tokens"),
    ("temperature-negative", {"temperature": -1}, "temperature"),
    ("top-p-above-one", {"top_p": 7}, "top_p"),
    ("seed-beyond-int64", {"seed": 2**63}, "seed"),
    ("empty-messages", {"messages": []}, "messages"),
    ("million-logit-bias", {"logit_bias": {str(i): 1 for i in range(1_000_000)}}, "logit_bias"),
    ("token-beyond-vocab", {"logit_bias": {"4294967296": 5}}, "logit_bias"),
    ("wrong-type-messages", {"messages": "hello"}, "messages"),
    ("wrong-type-stop", {"stop": {"a": 1}}, "stop"),
    ("wrong-type-max-tokens", {"max_tokens": "8"}, "max_tokens"),
]


@pytest.mark.parametrize(
    ("override", "param"), [pytest.param(o, p, id=i) for i, o, p in OUT_OF_RANGE]
)
def test_out_of_range_parameters_are_refused_in_realtime(
    http: httpx.Client, override: dict[str, Any], param: str
) -> None:
    body = {**chat_line("x", "Hi", max_tokens=2)["body"], **override}
    started = time.monotonic()
    error = openai_error(http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] is not None and error["param"].startswith(param), error
    assert time.monotonic() - started < 30  # refused up front, not after a generation


def test_out_of_range_parameters_become_error_lines_and_siblings_complete(
    client: openai.OpenAI,
) -> None:
    lines = [chat_line("good", "Hi", max_tokens=2)]
    for name, override, _ in OUT_OF_RANGE:
        if name == "million-logit-bias":
            continue  # beyond the line-length limit, refused at validation (below)
        lines.append(
            {
                **chat_line(name, "Hi", max_tokens=2),
                "body": {**chat_line(name, "Hi", max_tokens=2)["body"], **override},
            }
        )
    batch = run_file(client, jsonl(lines))
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == 1
    assert batch.request_counts.failed == len(lines) - 1
    errors = {r["custom_id"]: r["response"] for r in read_jsonl(client, batch.error_file_id)}
    for name, _, param in OUT_OF_RANGE:
        if name in errors:
            assert errors[name]["status_code"] == 400
            assert errors[name]["body"]["error"]["param"].startswith(param), errors[name]


def test_anthropic_out_of_range_parameters(http: httpx.Client) -> None:
    base = {"model": "default", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    cases = [
        {"max_tokens": 2**31},
        {"max_tokens": -1},
        {"messages": []},
        {"top_k": 2**40},
        {"temperature": 5},
        {"messages": "hello"},
        {"system": 5},
    ]
    for override in cases:
        response = http.post("/v1/messages", json={**base, **override})
        anthropic_error(response, 400)
    # In a batch, params are checked per request (as Anthropic does): each is an errored
    # result naming its field, and its well-formed sibling succeeds.
    fields = ["max_tokens", "max_tokens", "messages", "top_k", "temperature", "messages", "system"]
    requests = [{"custom_id": "good", "params": base}] + [
        {"custom_id": f"bad-{i}", "params": {**base, **override}}
        for i, override in enumerate(cases)
    ]
    created = http.post("/v1/messages/batches", json={"requests": requests})
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]
    deadline = time.monotonic() + 120
    while http.get(f"/v1/messages/batches/{batch_id}").json()["processing_status"] != "ended":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    results = http.get(f"/v1/messages/batches/{batch_id}/results")
    assert results.status_code == 200, results.text
    by_id = {r["custom_id"]: r["result"] for r in map(json.loads, results.text.splitlines())}
    assert sorted(by_id) == sorted(r["custom_id"] for r in requests)  # each answered once
    assert by_id.pop("good")["type"] == "succeeded"
    for i, field in enumerate(fields):
        result = by_id[f"bad-{i}"]
        assert result["type"] == "errored", (cases[i], result)
        error = result["error"]
        assert error["type"] == "error", error
        assert error["error"]["type"] == "invalid_request_error", (cases[i], error)
        assert error["error"]["message"].startswith(f"{field}"), (cases[i], error)


# ------------------------------------------------------------- JSON bodies of the wrong type

WRONG_VALUES: list[Any] = [None, 5, 1.5, True, "x", [], {}, [1, 2], {"a": {"b": "c"}}]


@pytest.mark.parametrize("field", ["input_file_id", "endpoint", "completion_window", "metadata"])
def test_create_batch_with_every_wrong_type_at_every_field(
    client: openai.OpenAI, http: httpx.Client, field: str
) -> None:
    valid = {
        "input_file_id": upload(client, [chat_line("a", "Hi", max_tokens=1)]),
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"k": "v"},
    }
    for value in WRONG_VALUES:
        if field == "metadata" and value in (None, {}):
            continue  # both legal: no metadata
        response = http.post("/v1/batches", json={**valid, field: value})
        error = openai_error(response, 400)  # an unknown input_file_id too, naming the field
        assert error["param"] is not None and error["param"].startswith(field), (value, error)


@pytest.mark.parametrize("body", [[], "x", 5, None, [{"input_file_id": "x"}]])
def test_non_object_bodies_on_every_create(http: httpx.Client, body: Any) -> None:
    for path in ("/v1/batches", "/v1/chat/completions", "/v1/completions"):
        openai_error(http.post(path, json=body), 400)
    for path in ("/v1/messages/batches", "/v1/messages"):
        anthropic_error(http.post(path, json=body), 400)


def test_anthropic_create_with_wrong_types_at_every_field(http: httpx.Client) -> None:
    params = {"model": "default", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    bodies = [
        {"requests": "x"},
        {"requests": {}},
        {"requests": []},
        {"requests": [5]},
        {"requests": [{"custom_id": 5, "params": params}]},
        {"requests": [{"custom_id": "../x", "params": params}]},
        {"requests": [{"custom_id": "a\u0000", "params": params}]},
        {"requests": [{"custom_id": "a", "params": "x"}]},
        {"requests": [{"custom_id": "a", "params": params}, {"custom_id": "a", "params": params}]},
    ]
    for body in bodies:
        anthropic_error(http.post("/v1/messages/batches", json=body), 400)


def test_duplicate_keys_and_depth_in_api_bodies(http: httpx.Client) -> None:
    duplicated = b'{"endpoint": "/v1/chat/completions", "endpoint": "/v1/completions"}'
    error = openai_error(
        http.post("/v1/batches", content=duplicated, headers={"Content-Type": "application/json"}),
        400,
    )
    assert "twice" in error["message"]
    deep = b'{"model": "default", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    openai_error(
        http.post(
            "/v1/chat/completions", content=deep, headers={"content-type": "application/json"}
        ),
        400,
    )
    anthropic_error(
        http.post("/v1/messages", content=deep, headers={"content-type": "application/json"}), 400
    )
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        body = (
            b'{"model": "default", "max_tokens": 4, "temperature": '
            + literal
            + b', "messages": []}'
        )
        anthropic_error(
            http.post("/v1/messages", content=body, headers={"content-type": "application/json"}),
            400,
        )


# ------------------------------------------------------------------ ids in paths and queries

HOSTILE_IDS = [
    "../../../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "file-x%00.jsonl",
    "' OR '1'='1",
    "batch_\uff41bc",
    "x" * 5000,
]


def test_hostile_ids_in_paths_are_plain_404s(http: httpx.Client) -> None:
    for hostile in HOSTILE_IDS:
        segment = urllib.parse.quote(hostile, safe="")  # one path segment, as a client sends it
        for path in (
            f"/v1/files/{segment}",
            f"/v1/files/{segment}/content",
            f"/v1/batches/{segment}",
            f"/v1/batches/{segment}/cancel",
        ):
            response = http.post(path) if path.endswith("/cancel") else http.get(path)
            openai_error(response, 404)
        for path in (f"/v1/messages/batches/{segment}", f"/v1/messages/batches/{segment}/results"):
            anthropic_error(http.get(path), 404)
    # Unencoded, the dot segments are resolved (by the client or the server): never a file read.
    response = http.get("/v1/files/../../../../etc/passwd")
    assert response.status_code == 404 and "root:" not in response.text


def test_a_foreign_id_answers_exactly_like_an_unknown_one(
    http: httpx.Client, bystander: Bystander, server: ServerProcess
) -> None:
    """No existence oracle: the bystander's ids, asked for by another tenant, get the very
    answer (status and body, the id aside) that ids nobody owns get."""
    unknown_batch = "batch_" + "0" * (len(bystander.batch_id) - len("batch_"))
    unknown_file = "file-" + "0" * (len(bystander.input_file_id) - len("file-"))

    def answers(batch_id: str, file_id: str) -> list[tuple[int, str]]:
        calls = [
            http.get(f"/v1/batches/{batch_id}"),
            http.post(f"/v1/batches/{batch_id}/cancel"),
            http.get(f"/v1/files/{file_id}"),
            http.get(f"/v1/files/{file_id}/content"),
            http.delete(f"/v1/files/{file_id}"),
            http.post(
                "/v1/batches",
                json={
                    "input_file_id": file_id,
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                },
            ),
        ]
        return [
            (r.status_code, r.text.replace(batch_id, "ID").replace(file_id, "ID")) for r in calls
        ]

    foreign = answers(bystander.batch_id, bystander.input_file_id)
    assert foreign == answers(unknown_batch, unknown_file)
    assert [status for status, _ in foreign] == [404, 404, 404, 404, 404, 400]
    for _, text in foreign:
        assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
    # ...and asking changed nothing of theirs.
    theirs = bystander_client(server)
    assert theirs.files.retrieve(bystander.input_file_id).id == bystander.input_file_id
    assert theirs.batches.retrieve(bystander.batch_id).status not in ("cancelling", "cancelled")


def test_hostile_pagination_cursors(http: httpx.Client) -> None:
    for hostile in HOSTILE_IDS[:5]:
        assert http.get("/v1/batches", params={"after": hostile}).json()["data"] == []
        assert http.get("/v1/files", params={"after": hostile}).status_code in (200, 400, 404)
        listed = http.get("/v1/messages/batches", params={"before_id": hostile})
        assert listed.status_code in (200, 400, 404), listed.text
    for limit in ("0", "-1", "1e9", "x", "9" * 40, "1\x00"):
        openai_error(http.get("/v1/batches", params={"limit": limit}), 400)
        anthropic_error(http.get("/v1/messages/batches", params={"limit": limit}), 400)
    openai_error(http.get("/v1/batches", params={"limit": "101"}), 400)
    anthropic_error(http.get("/v1/messages/batches", params={"limit": "1001"}), 400)


def test_metadata_with_sql_and_nul_is_stored_verbatim_or_refused(client: openai.OpenAI) -> None:
    file_id = upload(client, [chat_line("a", "Hi", max_tokens=1)])
    batch = client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"q": "'; DELETE FROM batches; --", "look": "\uff41\u0430"},
    )
    assert client.batches.retrieve(batch.id).metadata == {
        "q": "'; DELETE FROM batches; --",
        "look": "\uff41\u0430",
    }
    with pytest.raises(openai.BadRequestError):
        client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"nul": "a\u0000b"},
        )
    wait_for(client, batch.id)


# ---------------------------------------------------------------------------- multipart


def multipart(
    parts: list[tuple[str, str | None, bytes]], boundary: str = "hostileboundary"
) -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += (
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode()


def post_form(http: httpx.Client, body: bytes, boundary: str = "hostileboundary") -> httpx.Response:
    return http.post(
        "/v1/files",
        content=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )


def test_multipart_without_filename_gets_a_default_name(http: httpx.Client) -> None:
    data = jsonl([chat_line("a", "Hi", max_tokens=1)])
    response = post_form(http, multipart([("purpose", None, b"batch"), ("file", None, data)]))
    assert response.status_code == 200, response.text
    assert response.json()["filename"].endswith(".jsonl")


def test_traversal_filename_writes_nothing_outside_the_data_dir(
    http: httpx.Client, server: ServerProcess, tmp_path: Path
) -> None:
    target = tmp_path / f"escaped-{uuid.uuid4().hex}.jsonl"
    traversal = "../" * 30 + str(target).lstrip("/")
    data = jsonl([chat_line("a", "Hi", max_tokens=1)])
    for filename in (traversal, str(target), "..\\..\\..\\evil.jsonl", "a\x00b.jsonl"):
        response = post_form(
            http, multipart([("purpose", None, b"batch"), ("file", filename, data)])
        )
        assert response.status_code in (200, 400), response.text
        if response.status_code == 200:
            name = response.json()["filename"]
            assert "/" not in name and "\\" not in name and "\x00" not in name, name
        else:
            openai_error(response, 400)
    assert not target.exists()
    assert not (server.data_dir.parent / "evil.jsonl").exists()


def test_two_file_parts_are_refused(http: httpx.Client) -> None:
    data = jsonl([chat_line("a", "Hi", max_tokens=1)])
    body = multipart(
        [("purpose", None, b"batch"), ("file", "a.jsonl", data), ("file", "b.jsonl", data)]
    )
    error = openai_error(post_form(http, body), 400)
    assert error["param"] == "file"


def test_malformed_multipart_bodies(http: httpx.Client) -> None:
    data = jsonl([chat_line("a", "Hi", max_tokens=1)])
    whole = multipart([("purpose", None, b"batch"), ("file", "a.jsonl", data)])
    openai_error(post_form(http, whole[: len(whole) // 2]), 400)  # no closing boundary
    openai_error(post_form(http, whole, boundary="another"), 400)  # boundary never appears
    openai_error(http.post("/v1/files", content=whole), 400)  # no multipart content type
    openai_error(post_form(http, b""), 400)


@pytest.mark.parametrize("length", [1, 70, 256])
def test_a_boundary_up_to_256_characters_is_parsed(http: httpx.Client, length: int) -> None:
    boundary = ("b" * length)[:length]
    data = jsonl([chat_line("a", "Hi", max_tokens=1)])
    body = multipart([("purpose", None, b"batch"), ("file", "a.jsonl", data)], boundary)
    response = post_form(http, body, boundary)
    assert response.status_code == 200, response.text
    assert response.json()["bytes"] == len(data)


@pytest.mark.parametrize("length", [257, 10_000])
def test_a_boundary_over_256_characters_is_a_400_naming_it(
    http: httpx.Client, server: ServerProcess, length: int
) -> None:
    boundary = "b" * length
    body = multipart([("purpose", None, b"batch"), ("file", "a.jsonl", b"{}\n")], boundary)
    error = openai_error(post_form(http, body, boundary), 400)
    assert error["param"] == "Content-Type"
    assert f"{length} characters" in error["message"]
    still_serving(server)


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=", "multipart/form-data"])
def test_an_empty_or_missing_boundary_is_a_400_naming_it(
    http: httpx.Client, server: ServerProcess, content_type: str
) -> None:
    body = multipart([("purpose", None, b"batch"), ("file", "a.jsonl", b"{}\n")])
    response = http.post("/v1/files", content=body, headers={"Content-Type": content_type})
    error = openai_error(response, 400)
    assert error["param"] == "Content-Type" and "boundary" in error["message"]
    still_serving(server)


def raw_exchange(server: ServerProcess, head: bytes, body: bytes, *, read_timeout: float) -> bytes:
    """Send bytes over a bare socket (what no HTTP client would let us send) and read the reply."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=read_timeout) as sock:
        sock.sendall(head + body)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def upload_head(length: int, boundary: str = "hostileboundary") -> bytes:
    return (
        f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    ).encode()


def test_a_content_length_shorter_than_the_body(server: ServerProcess) -> None:
    body = multipart(
        [("purpose", None, b"batch"), ("file", "a.jsonl", jsonl([chat_line("a", "Hi")]))]
    )
    reply = raw_exchange(server, upload_head(len(body) // 2), body, read_timeout=30)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:300]
    assert b'"error"' in reply
    still_serving(server)


def test_a_content_length_longer_than_the_body_times_out(server: ServerProcess) -> None:
    body = multipart(
        [("purpose", None, b"batch"), ("file", "a.jsonl", jsonl([chat_line("a", "Hi")]))]
    )
    started = time.monotonic()
    reply = raw_exchange(server, upload_head(len(body) * 10), body, read_timeout=60)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:300]
    assert b"request_timeout" in reply
    assert time.monotonic() - started < 30


def test_a_slow_upload_that_never_finishes_holds_nothing(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    """Several uploads stall mid-body; meanwhile everything else is served at once, and each
    stalled one is cut off with a 408 after the idle timeout."""
    replies: list[bytes] = []

    def stall() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            sock.sendall(upload_head(10_000_000) + b"--hostileboundary\r\n")
            replies.append(sock.recv(65536))

    stallers = [threading.Thread(target=stall) for _ in range(8)]
    for thread in stallers:
        thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert client.files.list().data is not None
    upload(client, [chat_line("a", "Hi", max_tokens=1)])
    assert time.monotonic() - started < IDLE_TIMEOUT_SECONDS  # served while the others stall
    for thread in stallers:
        thread.join(timeout=60)
    assert len(replies) == len(stallers)
    assert all(reply.startswith(b"HTTP/1.1 408") for reply in replies), replies


def test_a_slow_json_body_times_out_on_both_surfaces(server: ServerProcess) -> None:
    for path in ("/v1/batches", "/v1/messages/batches"):
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n"
        ).encode()
        reply = raw_exchange(server, head, b'{"requests": [', read_timeout=60)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:300]
        payload = json.loads(reply.split(b"\r\n\r\n", 1)[1])
        if path.startswith("/v1/messages"):
            assert payload["type"] == "error" and payload["error"]["type"] == "timeout_error"
        else:
            assert payload["error"]["code"] == "request_timeout"


# ------------------------------------------------------------------ deletion and races


def test_requests_after_deletion(client: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    file_id = upload(client, [chat_line("a", "Hi", max_tokens=1)])
    client.files.delete(file_id)
    for call in (
        lambda: client.files.retrieve(file_id),
        lambda: client.files.content(file_id),
        lambda: client.files.delete(file_id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError, match="No such File"):
        client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    params = {"model": "default", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    batch = claude.messages.batches.create(requests=[{"custom_id": "a", "params": params}])
    deadline = time.monotonic() + 120
    while claude.messages.batches.retrieve(batch.id).processing_status != "ended":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    claude.messages.batches.delete(batch.id)
    for call in (
        lambda: claude.messages.batches.retrieve(batch.id),
        lambda: list(claude.messages.batches.results(batch.id)),
        lambda: claude.messages.batches.cancel(batch.id),
        lambda: claude.messages.batches.delete(batch.id),
    ):
        with pytest.raises(anthropic.NotFoundError):
            call()


def test_deleting_the_input_file_of_a_running_batch_loses_nothing(client: openai.OpenAI) -> None:
    lines = [chat_line(f"r{i}", "Say yes.", max_tokens=2) for i in range(8)]
    file_id = upload(client, lines)
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    # While the file is being validated, deleting it is refused by name; right after, allowed.
    deadline = time.monotonic() + 60
    while True:
        try:
            client.files.delete(file_id)
            break
        except openai.BadRequestError as exc:
            assert "being validated" in str(exc) and batch.id in str(exc), exc
            assert time.monotonic() < deadline
            time.sleep(0.05)
    done = wait_for(client, batch.id)
    assert done.status == "completed"
    assert sorted(r["custom_id"] for r in read_jsonl(client, done.output_file_id)) == sorted(
        f"r{i}" for i in range(8)
    )


def test_cancel_racing_completion_answers_every_request_once(client: openai.OpenAI) -> None:
    with_requests = 0
    for attempt in range(6):
        lines = [chat_line(f"r{i}", "Say yes.", max_tokens=2) for i in range(4)]
        batch = client.batches.create(
            input_file_id=upload(client, lines),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        time.sleep(0.2 * attempt)  # from before the first result to after the last
        try:
            client.batches.cancel(batch.id)
        except openai.BadRequestError as exc:  # it had already ended: the only legal refusal
            assert "completed" in str(exc) or "failed" in str(exc), exc
        done = wait_for(client, batch.id)
        assert done.status in ("cancelled", "completed"), done.status
        answered = read_jsonl(client, done.output_file_id) + read_jsonl(client, done.error_file_id)
        ids = [r["custom_id"] for r in answered]
        if done.status == "cancelled" and done.request_counts.total == 0:
            # Cancelled before its file was read: no request was queued, none is answered.
            assert answered == [] and done.output_file_id is None, done
            continue
        with_requests += 1
        # Otherwise, cancelled or not, every request is answered exactly once: a result, an
        # error, or a batch_cancelled line for one that never ran.
        assert sorted(ids) == sorted(f"r{i}" for i in range(len(lines))), (done.status, ids)
        counts = done.request_counts
        assert counts.total == len(lines), counts
        assert counts.completed + counts.failed == len(answered), counts
        if done.status == "cancelled":
            for row in read_jsonl(client, done.error_file_id):
                if row["response"] is None:
                    assert row["error"]["code"] == "batch_cancelled", row
    assert with_requests > 0  # not every cancel came before validation


def test_cancel_racing_validation_queues_all_of_the_file_or_none(client: openai.OpenAI) -> None:
    """A cancel that lands while a big file's rows are being inserted (in chunks of 2,000)
    must not leave the batch with some of its lines answered and the rest dropped: either
    none of the file was queued, or every line is answered once."""
    n = 12_000
    lines = [chat_line(f"v{i}", "Hi", max_tokens=1) for i in range(n)]
    file_id = upload(client, lines)
    for step in range(10):  # from before the first chunk to after the last
        delay = 0.15 * step
        batch = client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        time.sleep(delay)
        client.batches.cancel(batch.id)
        done = wait_for(client, batch.id)
        assert done.status == "cancelled", done.status
        total = done.request_counts.total
        assert total in (0, n), done.request_counts
        if total:
            answered = read_jsonl(client, done.output_file_id)
            answered += read_jsonl(client, done.error_file_id)
            assert sorted(r["custom_id"] for r in answered) == sorted(f"v{i}" for i in range(n))


def test_delete_racing_a_running_anthropic_batch(claude: anthropic.Anthropic) -> None:
    params = {"model": "default", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    requests = [{"custom_id": f"r{i}", "params": params} for i in range(8)]
    batch = claude.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    refusals = 0
    stop = threading.Event()

    def hammer() -> None:
        nonlocal refusals
        while not stop.is_set():
            try:
                claude.messages.batches.delete(batch.id)
                return
            except anthropic.BadRequestError:
                refusals += 1  # still running: deleting it now is refused
            except anthropic.NotFoundError:
                return
            time.sleep(0.05)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    stop.set()
    assert refusals > 0  # it was refused while the batch ran...
    with pytest.raises(anthropic.NotFoundError):  # ...and deleted once it had ended
        claude.messages.batches.retrieve(batch.id)


# ------------------------------------------------------------------------- the bystander


def test_zz_the_bystander_tenant_lost_nothing(server: ServerProcess, bystander: Bystander) -> None:
    # It was running when the hostile input began (how far into it depends on the engine's
    # speed: it is sized to run through most of the module on this machine).
    assert BYSTANDER_SEEN[0] not in TERMINAL, BYSTANDER_SEEN
    other = bystander_client(server)
    done = wait_for(other, bystander.batch_id, timeout=900)  # a hang guard for a loaded machine
    running = sum(status not in TERMINAL for status in BYSTANDER_SEEN)
    assert done.status == "completed", (done.status, f"ran through {running} tests")
    assert done.request_counts.completed == BYSTANDER_REQUESTS
    assert done.request_counts.failed == 0
    results = read_jsonl(other, done.output_file_id)
    assert done.error_file_id is None
    # Every row exactly once.
    assert sorted(r["custom_id"] for r in results) == sorted(
        f"b{i}" for i in range(BYSTANDER_REQUESTS)
    )
    assert all(r["response"]["status_code"] == 200 for r in results)
    still_serving(server)
    # Nothing the hostile tenant did is visible to the bystander, nor the other way round.
    assert [b.id for b in other.batches.list().data] == [bystander.batch_id]


def test_zz_keys_are_never_logged(server: ServerProcess) -> None:
    """Neither a configured key nor a wrong one that was presented appears in the log."""
    for headers in (
        {"Authorization": f"Bearer {WRONG_KEY}"},
        {"x-api-key": WRONG_KEY},
        {"Authorization": f"Bearer {KEY}", "x-api-key": WRONG_KEY},
        {"Authorization": WRONG_KEY},  # no "Bearer"
    ):
        for path in ("/v1/batches", "/v1/messages/batches", f"/v1/files/{WRONG_KEY}"):
            response = httpx.get(server.url + path, headers=headers, timeout=30)
            assert response.status_code == 401, (headers, path, response.text)
            assert WRONG_KEY not in response.text
    assert server.log_path is not None
    log = server.log_path.read_text(errors="replace")
    assert "batch validated" in log and "Application startup complete" in log  # the real log
    for secret in (KEY, BYSTANDER_KEY, WRONG_KEY):
        assert secret not in log, secret
