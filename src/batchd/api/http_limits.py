"""Bounds on a request's head (request line and headers), enforced while it is parsed.

uvicorn's httptools protocol reads a head of any size: a 64 MB header was read in full before
its 401. This protocol counts the head's bytes as they arrive and its headers as they are
parsed, and past either limit answers ``431 Request Header Fields Too Large`` in the error
shape of the surface the request line names (when enough of it arrived to tell), then closes
the connection. The rest of the server never sees the request.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from batchd import ids

STATUS = 431


class _HeadRefused(Exception):
    """Raised inside a parser callback to stop parsing; the refusal is already recorded."""


def refusal_body(url: bytes, message: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The 431's JSON body and extra headers, in the shape of the surface ``url`` names."""
    path = re.sub(rb"/+", b"/", url.split(b"?", 1)[0])
    if path.startswith(b"/v1/messages"):
        request_id = ids.request_id()
        body: dict[str, Any] = {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": message},
            "request_id": request_id,
        }
        id_bytes = request_id.encode()
        return orjson.dumps(body), [(b"x-request-id", id_bytes), (b"request-id", id_bytes)]
    error = {"message": message, "type": "invalid_request_error", "param": None}
    return orjson.dumps({"error": {**error, "code": "request_header_fields_too_large"}}), []


def bounded_http_protocol(max_head_bytes: int, max_headers: int) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with these limits on every request's head."""

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _head_open = True  # bytes arriving now belong to a request's head
        _head_bytes = 0
        _header_count = 0
        _refusal: str | None = None

        def data_received(self, data: bytes) -> None:
            if self._refusal is not None:
                return
            super().data_received(data)
            if self._head_open and self._refusal is None:
                # The chunk ended inside a head. Counted after parsing, because a chunk that
                # completes a small head may carry a large body with it.
                self._head_bytes += len(data)
                if self._head_bytes > max_head_bytes:
                    self._refuse(
                        f"The request line and headers are over {max_head_bytes} bytes "
                        f"({self._head_bytes} received so far); the limit is {max_head_bytes}"
                        " bytes (max_header_bytes)."
                    )

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_open, self._head_bytes, self._header_count = True, 0, 0

        def on_url(self, url: bytes) -> None:
            super().on_url(url)
            if len(self.url) > max_head_bytes:
                self._refuse_in_callback(
                    f"The request line is over {max_head_bytes} bytes; the limit for the request"
                    f" line and headers is {max_head_bytes} bytes (max_header_bytes)."
                )

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_count += 1
            if self._header_count > max_headers:
                self._refuse_in_callback(
                    f"The request has over {max_headers} headers; the limit is {max_headers}"
                    " (max_headers)."
                )
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._head_open = False
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            # uvicorn's answer to any parser error, ours included: ours gets the 431.
            if self._refusal is not None:
                self._send_refusal(self._refusal)
            else:
                super().send_400_response(msg)

        def _refuse_in_callback(self, message: str) -> None:
            self._refusal = message
            raise _HeadRefused(message)

        def _refuse(self, message: str) -> None:
            self._refusal = message
            self._send_refusal(message)

        def _send_refusal(self, message: str) -> None:
            self.logger.warning("refused a request head: %s", message)
            body, extra = refusal_body(getattr(self, "url", b""), message)
            head = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
            headers = [
                *self.server_state.default_headers,
                *extra,
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            head += [name + b": " + value + b"\r\n" for name, value in headers]
            self.transport.write(b"".join([*head, b"\r\n", body]))
            self.transport.close()

    return BoundedHttpToolsProtocol
