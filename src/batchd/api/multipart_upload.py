"""Streaming multipart/form-data parsing for uploads: file bytes go straight to a blob, the
size limit is enforced while reading, and nothing is buffered whole in memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from batchd.api.json_body import iter_body
from batchd.blobs.base import BlobStore, Writer
from batchd.errors import InvalidRequest, PayloadTooLarge, RequestTimeout

MAX_FIELD_BYTES = 4096
MAX_FIELDS = 16


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    blob: Writer | None = None
    file_complete: bool = False  # the file part's closing boundary arrived

    def abort(self) -> None:
        if self.blob is not None:
            self.blob.abort()


class _PartState:
    def __init__(self) -> None:
        self.header_field = bytearray()
        self.header_value = bytearray()
        self.headers: dict[bytes, bytes] = {}
        self.name: str | None = None
        self.filename: str | None = None
        self.value = bytearray()
        self.is_file = False


# RFC 2046 allows 70 characters; the parser takes up to this many, and clients send ~32-70.
MAX_BOUNDARY_LENGTH = 256


def _parser(boundary: bytes, callbacks: dict[str, Any]) -> MultipartParser:
    """The streaming parser for ``boundary``, or a 400 naming what is wrong with it (the
    parser's own constructor refuses some boundaries with an exception of its own)."""
    if len(boundary) > MAX_BOUNDARY_LENGTH:
        raise InvalidRequest(
            f"The multipart boundary is {len(boundary)} characters long; at most "
            f"{MAX_BOUNDARY_LENGTH} are accepted (RFC 2046 allows 70).",
            param="Content-Type",
        )
    try:
        return MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    except Exception as exc:
        raise InvalidRequest(
            f"The multipart boundary in Content-Type is not usable: {exc}", param="Content-Type"
        ) from None


async def parse_upload(request: Request, blobs: BlobStore, max_file_bytes: int) -> Upload:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type == b"multipart/form-data" and not boundary:
        raise InvalidRequest(
            "The Content-Type multipart/form-data has no boundary (or an empty one): the parts"
            " of the form cannot be told apart.",
            param="Content-Type",
        )
    if content_type != b"multipart/form-data" or not boundary:
        raise InvalidRequest(
            "Uploads must be multipart/form-data with a 'file' part and a 'purpose' field.",
            param="file",
        )
    upload = Upload()
    part = _PartState()
    errors: list[Exception] = []
    declared = request.headers.get("content-length", "")

    def _file_too_large(received: int) -> PayloadTooLarge:
        # The reading stops here, so the file's full size is unknown: name what arrived, and
        # what the client said it would send.
        whole = f"; the request's Content-Length is {declared} bytes" if declared.isdigit() else ""
        return PayloadTooLarge(
            f"File is too large: {received} bytes of it had arrived when the upload was cut"
            f" off{whole}; the limit is {max_file_bytes} bytes per file (max_upload_bytes).",
            param="file",
        )

    def on_part_begin() -> None:
        nonlocal part
        part = _PartState()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part.header_field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part.header_value += data[start:end]

    def on_header_end() -> None:
        part.headers[bytes(part.header_field).lower()] = bytes(part.header_value)
        part.header_field.clear()
        part.header_value.clear()

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(part.headers.get(b"content-disposition", b""))
        name = disposition.get(b"name")
        part.name = name.decode("utf-8", "replace") if name is not None else None
        filename = disposition.get(b"filename")
        if filename is not None or part.name == "file":
            part.is_file = True
            part.filename = filename.decode("utf-8", "replace") if filename else None
            if upload.blob is not None:
                errors.append(InvalidRequest("Only one file part is allowed.", param="file"))
                return
            upload.blob = blobs.new_writer()
            upload.filename = part.filename

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if errors:
            return
        if part.is_file:
            if upload.blob is None:
                return
            if upload.blob.size + (end - start) > max_file_bytes:
                errors.append(_file_too_large(upload.blob.size + (end - start)))
                return
            upload.blob.write(data[start:end])
        else:
            part.value += data[start:end]
            if len(part.value) > MAX_FIELD_BYTES:
                errors.append(
                    InvalidRequest(
                        f"Form field {part.name!r} is longer than {MAX_FIELD_BYTES} bytes.",
                        param=part.name,
                    )
                )

    def on_part_end() -> None:
        if part.is_file:
            upload.file_complete = upload.blob is not None
        elif part.name is not None:
            if len(upload.fields) >= MAX_FIELDS:
                errors.append(InvalidRequest("Too many form fields.", param=part.name))
                return
            upload.fields[part.name] = part.value.decode("utf-8", "replace")

    parser = _parser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        async for chunk in iter_body(request):
            parser.write(chunk)
            if errors:
                raise errors[0]
        parser.finalize()
        if errors:
            raise errors[0]
        if upload.blob is not None and not upload.file_complete:
            # A body cut short (a Content-Length smaller than the form) must not be stored
            # as though the file had ended there.
            raise InvalidRequest(
                "The multipart body ended inside the file part (no closing boundary).",
                param="file",
            )
    except Exception as exc:
        upload.abort()
        if isinstance(exc, InvalidRequest | PayloadTooLarge | RequestTimeout):
            raise
        raise InvalidRequest(f"Malformed multipart body: {exc}", param="file") from None
    return upload
