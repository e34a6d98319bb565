"""OpenAPI declarations of the request bodies that routes read themselves.

The create and realtime routes parse their bodies by hand (streamed and size-limited, with
errors in each surface's own wire shape), so FastAPI cannot infer a request body for them and
the generated schema would show none. These declarations are attached with ``openapi_extra``:
they document the bodies for clients and give the schema-driven fuzz test
(``tests/e2e/test_fuzz_api.py``) something to generate from. They validate nothing; the
routes' own checks stay the one source of truth, and a field declared here that the server
cannot honour is still refused by name.
"""

from __future__ import annotations

from typing import Any

from batchd.protocol.openai.bodies import KNOWN_BATCH_ENDPOINTS

_STRING = {"type": "string"}
_MODEL = {"type": "string", "examples": ["default"]}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body is read from the raw request."""
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {"application/json": {"schema": schema}},
        }
    }


# ------------------------------------------------------------------------------ OpenAI

_OPENAI_TEXT_PART = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": _STRING},
    "required": ["type", "text"],
}

_OPENAI_SAMPLING = {
    "model": _MODEL,
    "max_tokens": _nullable({"type": "integer", "minimum": 1}),
    "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
    "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
    "n": _nullable({"type": "integer", "minimum": 1, "maximum": 1}),
    "stop": {
        "anyOf": [
            _STRING,
            {"type": "array", "items": _STRING, "maxItems": 4},
            {"type": "null"},
        ]
    },
    "seed": _nullable({"type": "integer"}),
    "stream": _nullable({"type": "boolean"}),
    "stream_options": _nullable(
        {"type": "object", "properties": {"include_usage": {"type": "boolean"}}}
    ),
    "user": _STRING,
}

CHAT_COMPLETION = json_body(
    {
        "type": "object",
        "properties": {
            **_OPENAI_SAMPLING,
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
                        "content": {
                            "anyOf": [
                                _STRING,
                                {"type": "array", "items": _OPENAI_TEXT_PART},
                                {"type": "null"},
                            ]
                        },
                        "name": _STRING,
                    },
                    "required": ["role"],
                },
            },
            "max_completion_tokens": _nullable({"type": "integer", "minimum": 1}),
        },
        "required": ["model", "messages"],
    },
    "An OpenAI chat completion request (text content only).",
)

COMPLETION = json_body(
    {
        "type": "object",
        "properties": {
            **_OPENAI_SAMPLING,
            "prompt": {
                "anyOf": [
                    _STRING,
                    {"type": "array", "items": _STRING, "minItems": 1, "maxItems": 1},
                ]
            },
        },
        "required": ["model", "prompt"],
    },
    "An OpenAI legacy completion request (one prompt).",
)

CREATE_BATCH = json_body(
    {
        "type": "object",
        "properties": {
            "input_file_id": _STRING,
            "endpoint": {"enum": list(KNOWN_BATCH_ENDPOINTS)},
            "completion_window": {
                "type": "string",
                "pattern": "^[0-9]+[mhd]$",
                "examples": ["24h"],
            },
            "metadata": _nullable(
                {
                    "type": "object",
                    "maxProperties": 16,
                    "additionalProperties": {"type": "string", "maxLength": 512},
                }
            ),
        },
        "required": ["input_file_id", "endpoint", "completion_window"],
    },
    "An OpenAI batch: an uploaded .jsonl file (purpose 'batch') and the endpoint its lines use.",
)


def upload_body(purposes: tuple[str, ...]) -> dict[str, Any]:
    """``openapi_extra`` for the multipart upload route."""
    return {
        "requestBody": {
            "required": True,
            "description": "A file upload, streamed to disk; purpose 'batch' needs a .jsonl file.",
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "purpose": {"enum": list(purposes)},
                        },
                        "required": ["file", "purpose"],
                    }
                }
            },
        }
    }


# --------------------------------------------------------------------------- Anthropic

_ANTHROPIC_TEXT_BLOCK = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": _STRING},
    "required": ["type", "text"],
    "additionalProperties": False,
}

_ANTHROPIC_CONTENT = {"anyOf": [_STRING, {"type": "array", "items": _ANTHROPIC_TEXT_BLOCK}]}

MESSAGE_PARAMS = {
    "type": "object",
    "properties": {
        "model": {"type": "string", "minLength": 1, "maxLength": 256, "examples": ["default"]},
        "max_tokens": {"type": "integer", "minimum": 1},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "role": {"enum": ["user", "assistant"]},
                    "content": _ANTHROPIC_CONTENT,
                },
                "required": ["role", "content"],
                "additionalProperties": False,
            },
        },
        "system": _ANTHROPIC_CONTENT,
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0},
        "stop_sequences": {"type": "array", "items": _STRING},
        "metadata": {
            "type": "object",
            "properties": {"user_id": _nullable({"type": "string", "maxLength": 256})},
            "additionalProperties": False,
        },
        "stream": {"type": "boolean"},
    },
    "required": ["model", "max_tokens", "messages"],
    "additionalProperties": False,
}

CREATE_MESSAGE = json_body(MESSAGE_PARAMS, "An Anthropic Messages request (text blocks only).")

CREATE_MESSAGE_BATCH = json_body(
    {
        "type": "object",
        "properties": {
            "requests": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "custom_id": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"},
                        "params": MESSAGE_PARAMS,
                    },
                    "required": ["custom_id", "params"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["requests"],
        "additionalProperties": False,
    },
    "An Anthropic message batch; each request's params are checked when it runs.",
)
