"""Schema-driven fuzzing of both API surfaces with schemathesis, against a real server.

Every operation of the server's own OpenAPI schema (the OpenAI files, batches and realtime
routes, and the Anthropic messages and message-batch routes) gets schemathesis' explicit
examples, its coverage cases (boundary values, missing and wrongly typed fields) and a fixed
budget of hypothesis examples in both positive and negative modes, derandomized so that a run
is reproducible. The property checked: no response is a 5xx, and every 4xx carries its
surface's error shape (OpenAI ``{"error": {message, type, param, code}}``; Anthropic
``{"type": "error", "error": {type, message}, "request_id"}``).

The engine is real (the bundled model), so requests that reach it are kept cheap: token
budgets inside the model's context are cut to a few tokens, out-of-range ones are sent as
generated (they exercise validation). Some cases get the served model name or the id of a
real object instead of the generated one, so the paths beyond "unknown model" and "no such
id" are fuzzed too.
"""

from __future__ import annotations

import collections
import json
import zlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from batchd.api.app import create_app
from batchd.config import Settings
from batchd.service.services import Services
from tests.support.serverproc import ServerProcess, running_server

FUZZ_KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {FUZZ_KEY}"}
# Per operation and generation phase; with the coverage and example phases this keeps the
# whole file well under two minutes on two cores.
MAX_EXAMPLES = 30
CHEAP_TOKENS = 3
# Small sequences: nothing here needs long prompts, and the engine starts faster.
SERVER_ENV = {"BATCHD_MAX_SEQS": "4", "BATCHD_CTX_SIZE": "2048"}
CONTEXT_PER_SEQUENCE = 2048 // 4

# Which path parameter holds which kind of real object, and which operations may destroy it
# (those get their own sacrificial object, so the others keep a live one to hit).
_PATH_KINDS = {"file_id": "file", "batch_id": "batch", "message_batch_id": "message_batch"}
_DESTRUCTIVE = {("DELETE", "file_id"), ("DELETE", "message_batch_id")}

# (method, path template) -> status codes seen, reported at the end and checked for coverage.
SEEN: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)


def _choose(case: Any, salt: str) -> bool:
    """A deterministic coin toss from the generated case itself, so runs stay reproducible."""
    seed = repr((salt, case.path_parameters, case.query, case.body)).encode(errors="replace")
    return zlib.crc32(seed) % 2 == 0


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # Its own server and tenant: the fuzzer leaves hundreds of objects behind, which must not
    # show up in the listings that the tests on the shared server assert on.
    with running_server(
        tmp_path_factory.mktemp("fuzz-data"), BATCHD_API_KEYS=FUZZ_KEY, **SERVER_ENV
    ) as srv:
        yield srv


def _tiny_lines(n: int) -> bytes:
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "default",
                "max_tokens": 2,
                "temperature": 0,
                "messages": [{"role": "user", "content": f"Say {i}."}],
            },
        }
        for i in range(n)
    ]
    return ("\n".join(json.dumps(line) for line in lines) + "\n").encode()


def _upload(client: httpx.Client, name: str) -> str:
    response = client.post(
        "/v1/files", files={"file": (name, _tiny_lines(2))}, data={"purpose": "batch"}
    )
    response.raise_for_status()
    return str(response.json()["id"])


def _message_batch(client: httpx.Client) -> str:
    params = {"model": "default", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    response = client.post(
        "/v1/messages/batches", json={"requests": [{"custom_id": "a", "params": params}]}
    )
    response.raise_for_status()
    return str(response.json()["id"])


@pytest.fixture(scope="module")
def real_ids(fuzz_server: ServerProcess) -> dict[tuple[str, bool], str]:
    """(kind, destructible) -> the id of a real object of that kind owned by the fuzz key."""
    with httpx.Client(base_url=fuzz_server.url, headers=AUTH, timeout=60) as client:
        file_id = _upload(client, "kept.jsonl")
        batch = client.post(
            "/v1/batches",
            json={
                "input_file_id": file_id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        )
        batch.raise_for_status()
        return {
            ("file", False): file_id,
            ("file", True): _upload(client, "doomed.jsonl"),
            ("batch", False): str(batch.json()["id"]),
            ("batch", True): str(batch.json()["id"]),
            ("message_batch", False): _message_batch(client),
            ("message_batch", True): _message_batch(client),
        }


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as sess:
        yield sess


def _cap_tokens(params: dict[str, Any], *, openai: bool, responses: bool = False) -> None:
    keys = ("max_tokens", "max_completion_tokens") if openai else ("max_tokens",)
    if responses:
        keys = ("max_output_tokens",)
    for key in keys:
        value = params.get(key)
        # In-range budgets would make the engine generate for seconds; out-of-range ones are
        # what the validation paths are about, so those go out as generated.
        if type(value) is int and 1 <= value <= CONTEXT_PER_SEQUENCE:
            params[key] = min(value, CHEAP_TOKENS)
    if openai and all(params.get(key) is None for key in keys):
        params[keys[0]] = CHEAP_TOKENS  # the default would run to the context's end


def _steer(case: Any, real_ids: dict[tuple[str, bool], str]) -> None:
    """Keep generation cheap, and point some cases at real objects and the served model."""
    method = case.method.upper()
    for name, value in list((case.path_parameters or {}).items()):
        kind = _PATH_KINDS.get(name)
        if kind is not None and isinstance(value, str) and _choose(case, name):
            case.path_parameters[name] = real_ids[(kind, (method, name) in _DESTRUCTIVE)]
    body = case.body
    if not isinstance(body, dict):
        return
    path = case.path
    if path in ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses"):
        params_list = [body]
    elif path == "/v1/messages/batches" and isinstance(body.get("requests"), list):
        params_list = [
            item["params"]
            for item in body["requests"]
            if isinstance(item, dict) and isinstance(item.get("params"), dict)
        ]
    else:
        params_list = []
    for params in params_list:
        _cap_tokens(
            params, openai=not path.startswith("/v1/messages"), responses=path == "/v1/responses"
        )
        if isinstance(params.get("model"), str) and _choose(case, "model"):
            params["model"] = "default"
    if (
        path == "/v1/batches"
        and isinstance(body.get("input_file_id"), str)
        and _choose(case, "input_file_id")
    ):
        body["input_file_id"] = real_ids[("file", False)]


def _check_error_shape(case: Any, response: Any) -> None:
    content_type = (response.headers.get("content-type") or [""])[0]
    assert content_type.startswith("application/json"), response.headers
    body = json.loads(response.content)
    if case.path.startswith("/v1/messages"):
        assert body.get("type") == "error", body
        error = body.get("error")
        assert isinstance(error, dict), body
        assert isinstance(error.get("type"), str), body
        assert isinstance(error.get("message"), str), body
        assert isinstance(body.get("request_id"), str), body
    else:
        error = body.get("error")
        assert isinstance(error, dict), body
        assert {"message", "type", "param", "code"} <= set(error), body
        assert isinstance(error["message"], str), body
        assert isinstance(error["type"], str), body


def app_openapi() -> dict[str, Any]:
    """The app's own OpenAPI document, built without serving: until its lifespan starts,
    ``create_app`` reads nothing of the services but the settings. Built at import time so
    that pytest collects one test per operation (``test_served_schema_is_the_fuzzed_one``
    checks that the live server serves this very document)."""
    services = cast(Services, SimpleNamespace(settings=Settings(api_keys=[FUZZ_KEY])))
    return create_app(services).openapi()


OPENAPI = app_openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,  # the same examples on every run and every machine
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
def test_no_server_errors_and_error_shapes(
    case: Any,
    fuzz_server: ServerProcess,
    session: requests.Session,
    real_ids: dict[tuple[str, bool], str],
) -> None:
    _steer(case, real_ids)
    response = case.call(base_url=fuzz_server.url, session=session, headers=AUTH, timeout=120)
    SEEN[f"{case.method.upper()} {case.path}"][response.status_code] += 1
    assert response.status_code < 500, (
        f"{response.status_code} {response.content[:1000]!r}\n"
        f"reproduce: {case.as_curl_command(AUTH, base_url=fuzz_server.url)}"
    )
    if response.status_code >= 400:
        _check_error_shape(case, response)


def test_served_schema_is_the_fuzzed_one(fuzz_server: ServerProcess) -> None:
    served = httpx.get(fuzz_server.url + "/openapi.json", headers=AUTH, timeout=30)
    assert served.status_code == 200, served.text
    assert served.json() == OPENAPI


def test_every_operation_was_fuzzed(fuzz_server: ServerProcess) -> None:
    """Runs after the fuzz tests (file order): each route got cases, and the server is intact."""
    operations = {
        f"{method.upper()} {path}"
        for path, methods in OPENAPI["paths"].items()
        for method in methods
    }
    assert operations, "the schema lists no operations"
    missing = sorted(op for op in operations if not SEEN.get(op))
    assert not missing, f"never exercised: {missing}"
    total = sum(sum(codes.values()) for codes in SEEN.values())
    summary = "\n".join(
        f"  {op}: {sum(codes.values())} cases, status {dict(sorted(codes.items()))}"
        for op, codes in sorted(SEEN.items())
    )
    print(f"\nfuzzed {total} requests over {len(SEEN)} operations:\n{summary}")
    # Whatever the fuzzer sent, the server still answers and its engine still works.
    response = httpx.post(
        fuzz_server.url + "/v1/chat/completions",
        headers=AUTH,
        json={
            "model": "default",
            "max_tokens": 2,
            "messages": [{"role": "user", "content": "Hi"}],
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
