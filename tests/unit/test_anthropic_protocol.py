"""The Anthropic wire layer and message-batch service without a server: conversions, the
envelope checks, list cursors, delete and finalize on a real SQLite store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.config import Settings
from batchd.engines.base import ChatMessage, GenerationResult, Priority
from batchd.errors import Conflict, InvalidRequest
from batchd.protocol import anthropic as am
from batchd.scheduler.finalize import finalize_batch
from batchd.service import message_batches
from batchd.service.services import Services
from batchd.store import database
from batchd.store.records import BatchStatus, RequestOutcome, RequestState
from batchd.store.store import Store


def params(**overrides: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}],
        **overrides,
    }


def invalid(body: Any, *, in_batch: bool = True) -> str:
    with pytest.raises(InvalidRequest) as excinfo:
        am.parse_params(body, in_batch=in_batch)
    return excinfo.value.message


def test_conversion_merges_turns_and_leads_with_the_system_prompt() -> None:
    parsed = am.parse_params(
        params(
            system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            messages=[
                {"role": "user", "content": "one"},
                {"role": "user", "content": [{"type": "text", "text": "two"}]},
                {"role": "assistant", "content": "three"},
                {"role": "user", "content": "four"},
            ],
            temperature=0.5,
            top_p=0.9,
            top_k=40,
            stop_sequences=["END", ""],
            metadata={"user_id": "u"},
        ),
        in_batch=True,
    )
    generation = parsed.to_generation(Priority.REALTIME)
    assert generation.messages == (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "one\n\ntwo"),
        ChatMessage("assistant", "three"),
        ChatMessage("user", "four"),
    )
    p = generation.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.stop) == (4, 0.5, 0.9, 40, ("END",))
    assert generation.priority == Priority.REALTIME
    defaults = am.parse_params(params(), in_batch=True).to_generation().params
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (1.0, 1.0, 0)


def test_prefill_passes_through_and_an_empty_one_is_dropped() -> None:
    turns = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "One,"}]
    generation = am.parse_params(params(messages=turns), in_batch=True).to_generation()
    assert generation.messages is not None
    assert generation.messages[-1] == ChatMessage("assistant", "One,")
    turns[-1]["content"] = ""
    generation = am.parse_params(params(messages=turns), in_batch=True).to_generation()
    assert generation.messages == (ChatMessage("user", "Count."),)


@pytest.mark.parametrize(
    ("body", "starts"),
    [
        (params(max_tokens=0), "max_tokens:"),
        (params(max_tokens="8"), "max_tokens:"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field"),
        (params(messages=[]), "messages:"),
        (params(messages=[{"role": "system", "content": "x"}]), "messages.0.role:"),
        (params(temperature=1.5), "temperature:"),
        (params(stream=True), "stream:"),
        (params(tools=[{"name": "t"}]), "tools:"),
        (params(tool_choice={"type": "any"}), "tool_choice:"),
        (params(thinking={"type": "enabled", "budget_tokens": 2048}), "thinking:"),
        (params(output_config={"format": {"type": "json_schema"}}), "output_config.format:"),
        (params(mcp_servers=[{}]), "mcp_servers:"),
        (params(metadata={"user_id": "u", "x": 1}), "metadata.x: Extra inputs"),
        (params(frobnicate=True), "frobnicate: Extra inputs are not permitted"),
        (
            params(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]),
            "messages.0.content.0: content blocks of type 'image'",
        ),
        (
            params(messages=[{"role": "user", "content": [{"type": "document"}]}]),
            "messages.0.content.0: content blocks of type 'document'",
        ),
        (params(system=[{"type": "text"}]), "system.0.text:"),
        (params(messages=[{"role": "user", "content": 3}]), "messages.0.content:"),
        ("not an object", "The request body"),
    ],
)
def test_invalid_params_name_their_field(body: Any, starts: str) -> None:
    assert invalid(body).startswith(starts)


def test_accepted_no_op_fields_and_realtime_stream() -> None:
    am.parse_params(
        params(
            cache_control={"type": "ephemeral"},
            service_tier="auto",
            thinking={"type": "disabled"},
            tool_choice={"type": "none"},
            output_config={"effort": "low"},
        ),
        in_batch=True,
    )
    assert am.parse_params(params(stream=True), in_batch=False).stream is True


def result(**overrides: Any) -> GenerationResult:
    values: dict[str, Any] = {
        "text": "hello",
        "finish_reason": "stop",
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "cached_tokens": 4,
    }
    return GenerationResult(**{**values, **overrides})


def test_message_body_maps_stop_reasons_and_usage() -> None:
    body = am.message_body("my-model", result(), service_tier="batch")
    assert list(body) == [
        "id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"
    ]  # fmt: skip
    assert body["id"].startswith("msg_") and body["model"] == "my-model"
    assert body["content"] == [{"type": "text", "text": "hello"}]
    assert (body["stop_reason"], body["stop_sequence"]) == ("end_turn", None)
    # No cache_control in the request: the 4 tokens the engine shared are no cache read.
    assert body["usage"] == {
        "input_tokens": 10,
        "output_tokens": 4,  # the end-of-turn token counts
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "server_tool_use": None,
        "service_tier": "batch",
    }
    capped = am.message_body("m", result(finish_reason="length"), service_tier="standard")
    assert capped["stop_reason"] == "max_tokens" and capped["usage"]["output_tokens"] == 3
    stopped = am.message_body("m", result(stop_sequence="END"), service_tier="batch")
    assert (stopped["stop_reason"], stopped["stop_sequence"]) == ("stop_sequence", "END")
    assert am.message_body("m", result(text=""), service_tier="batch")["content"] == []


def test_result_lines() -> None:
    message = orjson.dumps({"id": "msg_1"})
    assert orjson.loads(am.result_line("a", "succeeded", message)) == {
        "custom_id": "a",
        "result": {"type": "succeeded", "message": {"id": "msg_1"}},
    }
    error = orjson.dumps(am.error_body("invalid_request_error", "bad"))
    assert orjson.loads(am.result_line("b", "errored", error))["result"] == {
        "type": "errored",
        "error": {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "bad"},
            "request_id": None,
        },
    }
    assert orjson.loads(am.result_line("c", "canceled", None))["result"] == {"type": "canceled"}
    assert orjson.loads(am.result_line("d", "expired", None))["result"] == {"type": "expired"}


# ------------------------------------------------------------ on a real store


@pytest.fixture()
def services(tmp_path: Path) -> Services:
    engine = database.open_sqlite(tmp_path / "db.sqlite3")
    database.upgrade(engine)
    settings = Settings(data_dir=tmp_path, anthropic_max_batch_requests=3)
    # Only the settings and the store are used by these service functions.
    return Services(settings, Store(engine), None, None, None)  # type: ignore[arg-type]


def request(custom_id: str) -> dict[str, Any]:
    return {"custom_id": custom_id, "params": params()}


def test_create_checks_the_envelope(services: Services) -> None:
    def refused(body: Any) -> str:
        with pytest.raises(InvalidRequest) as excinfo:
            message_batches.create_message_batch(services, "t", body)
        return excinfo.value.message

    assert refused({"requests": [request(f"r{i}") for i in range(4)]}).startswith(
        "requests: the batch has 4 requests; the limit is 3 requests per batch"
    )
    assert refused({"requests": [request("a"), request("a")]}).startswith("requests.1.custom_id")
    assert refused({"requests": [request("a b")]}).startswith("requests.0.custom_id")
    assert refused({"requests": [{**request("a"), "x": 1}]}).startswith("requests.0.x: Extra")
    assert refused({}).startswith("requests: Field required")
    assert services.store.list_batches("t", "anthropic", after=None, limit=10) == ([], False)


def test_create_list_cancel_finalize_delete(services: Services) -> None:
    store = services.store
    made = [
        message_batches.create_message_batch(services, "t", {"requests": [request("a")]}).id
        for _ in range(3)
    ]
    record = store.get_batch(made[0], "t")
    assert record is not None
    assert (record.surface, record.endpoint, record.input_file_id) == (
        "anthropic",
        "/v1/messages",
        None,
    )
    assert record.status == BatchStatus.IN_PROGRESS and record.counts.pending == 1
    assert record.expires_at - record.created_at == 24 * 3600
    wire = am.message_batch_object(record, "http://h:1/")
    assert wire["processing_status"] == "in_progress" and wire["results_url"] is None
    assert wire["request_counts"]["processing"] == 1

    def page(**cursor: str | None) -> tuple[list[str], bool]:
        args: dict[str, Any] = {"after": None, "limit": 1, **cursor}
        records, more = store.list_batches("t", "anthropic", **args)
        return [r.id for r in records], more

    assert page() == ([made[2]], True)
    assert page(after=made[2]) == ([made[1]], True)
    assert page(after=made[1]) == ([made[0]], False)
    assert page(before=made[0]) == ([made[1]], True)
    assert page(before=made[1]) == ([made[2]], False)
    assert (
        store.list_batches("t", "anthropic", after=None, before=made[0], limit=5)[0][0].id
        == (made[2])
    )
    assert store.list_batches("other", "anthropic", after=None, limit=5) == ([], False)

    with pytest.raises(Conflict):
        message_batches.delete_message_batch(services, "t", made[0])
    with pytest.raises(InvalidRequest):
        message_batches.results_batch(services, "t", made[0])

    # Run the one row by hand, then finalize: no files, just the end.
    leased = store.lease("me", 10, 60)
    for item in leased:
        body = orjson.dumps(am.message_body("m", result(), service_tier="batch"))
        store.complete(item, "me", RequestOutcome(RequestState.SUCCEEDED, 200, body))
    assert finalize_batch(store, None, made[0]) == BatchStatus.COMPLETED  # type: ignore[arg-type]
    record = store.get_batch(made[0], "t")
    assert record is not None and record.output_file_id is None and record.error_file_id is None
    wire = am.message_batch_object(record, "http://h:1/")
    assert wire["processing_status"] == "ended" and wire["ended_at"].endswith("Z")
    assert wire["results_url"] == f"http://h:1/v1/messages/batches/{made[0]}/results"
    lines = b"".join(message_batches.iter_results(services, made[0])).splitlines()
    assert [orjson.loads(line)["result"]["type"] for line in lines] == ["succeeded"]

    message_batches.delete_message_batch(services, "t", made[0])
    assert store.get_batch(made[0]) is None
    assert list(store.iter_finished(made[0])) == []


# ------------------------------------------------------------------ prompt caching


def cached(prompt: int, shared: int, *marks: int) -> tuple[int, int, int]:
    return am.cache_usage(
        result(prompt_tokens=prompt, cached_tokens=shared, cache_prefix_tokens=marks)
    )


def test_cache_usage_counts_only_marked_prefixes() -> None:
    # (input_tokens, cache_creation_input_tokens, cache_read_input_tokens)
    assert cached(100, 60) == (100, 0, 0), "unmarked: the engine's sharing is no cache read"
    assert cached(100, 0, 60) == (40, 60, 0), "marked, not yet computed: a cache write"
    assert cached(100, 60, 60) == (40, 0, 60), "marked and shared: a cache read"
    assert cached(100, 70, 60) == (40, 0, 60), "sharing past the mark reads the mark only"
    assert cached(100, 59, 60) == (40, 60, 0), "a prefix shared short of the mark is a write"
    assert cached(100, 50, 30, 80) == (20, 50, 30), "read to the first mark, write to the last"
    assert cached(100, 90, 30, 80) == (20, 0, 80)
    assert cached(100, 100, 100) == (0, 0, 100)
    assert cached(100, 50, 0) == (100, 0, 0), "a mark the engine could not place counts nothing"
    for uncached, created, read in (cached(100, 50, 30, 80), cached(100, 0, 60)):
        assert uncached + created + read == 100


def test_message_body_reports_cache_reads_and_writes_of_marked_prefixes() -> None:
    usage = am.message_body(
        "m", result(cached_tokens=4, cache_prefix_tokens=(6,)), service_tier="batch"
    )["usage"]
    assert (usage["input_tokens"], usage["cache_creation_input_tokens"]) == (4, 6)
    assert usage["cache_read_input_tokens"] == 0
    assert usage["cache_creation"] == {
        "ephemeral_5m_input_tokens": 6,
        "ephemeral_1h_input_tokens": 0,
    }


def marked(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}


def plain(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def test_cache_control_marks_become_the_prefixes_up_to_each_marked_block() -> None:
    body = {
        "model": "m",
        "max_tokens": 4,
        "system": [plain("Be brief."), marked("Context.")],
        "messages": [
            {"role": "user", "content": [marked("Doc one."), plain("Question?")]},
            {"role": "assistant", "content": "Answer."},
            {"role": "user", "content": "Again?"},
        ],
    }
    generation = am.parse_params(body, in_batch=True).to_generation()
    system = ChatMessage("system", "Be brief.\n\nContext.")
    assert generation.messages == (
        system,
        ChatMessage("user", "Doc one.\n\nQuestion?"),
        ChatMessage("assistant", "Answer."),
        ChatMessage("user", "Again?"),
    )
    assert generation.cache_prefixes == (
        (system,),
        (system, ChatMessage("user", "Doc one.")),
    )
    # Top-level cache_control (automatic caching): a breakpoint on the last block.
    auto = am.parse_params({**body, "cache_control": {"type": "ephemeral"}}, in_batch=True)
    assert auto.to_generation().cache_prefixes[-1] == generation.messages
    # None marked: no prefixes, and the prompt is the same.
    unmarked = {**body, "system": "Be brief.\n\nContext.", "messages": body["messages"][1:]}
    assert am.parse_params(unmarked, in_batch=True).to_generation().cache_prefixes == ()


def test_more_than_four_cache_breakpoints_are_refused_naming_the_fifth() -> None:
    body = {
        "model": "m",
        "max_tokens": 4,
        "cache_control": {"type": "ephemeral"},
        "messages": [{"role": "user", "content": [marked(str(i)) for i in range(4)]}],
    }
    with pytest.raises(InvalidRequest) as refused:
        am.parse_params(body, in_batch=True)
    assert refused.value.param == "messages.0.content.3.cache_control"
    assert "A maximum of 4 blocks with cache_control may be provided. Found 5." in str(
        refused.value.message
    )
    body["messages"][0]["content"][0]["cache_control"] = "yes"
    with pytest.raises(InvalidRequest) as refused:
        am.parse_params(body, in_batch=True)
    assert refused.value.param == "messages.0.content.0.cache_control"
