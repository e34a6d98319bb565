"""File use cases: what an upload refuses (and that it leaves no bytes behind), downloads,
and a delete refused while a batch is still copying the file into rows."""

from __future__ import annotations

import pytest

from batchd.errors import Conflict, InvalidRequest, NotFound
from batchd.service import batches, files
from batchd.service.services import Services
from batchd.store.records import BatchStatus, FileRecord
from tests.unit.service.conftest import (
    LINE,
    OTHER,
    TENANT,
    MakeServices,
    batch_body,
    blob_names,
    upload,
)


def test_upload_registers_the_file_with_a_clean_name(services: Services) -> None:
    record = upload(services, filename="dir\\sub/in\nput.jsonl")
    assert (record.filename, record.purpose, record.bytes) == ("input.jsonl", "batch", len(LINE))
    assert record.expires_at == record.created_at + services.settings.file_retention_seconds
    assert upload(services, purpose="vision", filename="a.png").expires_at is None
    assert files.get_file(services, TENANT, record.id) == record
    got, chunks = files.open_content(services, TENANT, record.id)
    assert got == record and b"".join(chunks) == LINE
    listed, more = files.list_files(
        services, TENANT, purpose="batch", after=None, limit=10, order="desc"
    )
    assert ([r.id for r in listed], more) == ([record.id], False)


@pytest.mark.parametrize(
    ("purpose", "filename", "data", "param", "message"),
    [
        ("", "in.jsonl", LINE, "purpose", "Missing required parameter: 'purpose'."),
        ("fun", "in.jsonl", LINE, "purpose", "Invalid purpose 'fun': expected one of"),
        ("batch", "in.csv", LINE, "file", "Invalid file format for Batch API. Must be .jsonl"),
        ("batch", "in.jsonl", b"", "file", "The uploaded file is empty."),
    ],
)
def test_upload_refusals_leave_no_bytes(
    services: Services, purpose: str, filename: str, data: bytes, param: str, message: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        upload(services, data, purpose=purpose, filename=filename)
    assert refused.value.param == param and refused.value.message.startswith(message)
    assert blob_names(services) == []


def test_an_upload_without_a_file_part(services: Services) -> None:
    with pytest.raises(InvalidRequest) as refused:
        files.store_upload(services, TENANT, purpose="batch", filename=None, writer=None)
    assert refused.value.code == "missing_required_parameter"


def test_delete_is_refused_while_a_batch_validates_the_file(services: Services) -> None:
    file = upload(services)
    batch = batches.create_openai_batch(services, TENANT, batch_body(file.id))
    with pytest.raises(Conflict) as refused:
        files.delete_file(services, TENANT, file.id)
    assert (refused.value.param, refused.value.code) == ("file_id", "file_in_use")
    assert refused.value.message == (
        f"File {file.id} is being validated as the input of batch {batch.id}; delete it once"
        " that batch has left the 'validating' status."
    )
    assert blob_names(services) == [file.blob]  # untouched
    # Once validated, its rows hold their own copies: the file and its bytes can go.
    assert services.store.transition(batch.id, [BatchStatus.VALIDATING], BatchStatus.IN_PROGRESS)
    assert files.delete_file(services, TENANT, file.id).id == file.id
    assert blob_names(services) == []
    with pytest.raises(NotFound):
        files.delete_file(services, TENANT, file.id)


def test_files_of_another_tenant_are_not_found(services: Services) -> None:
    theirs = upload(services, tenant=OTHER)
    for call in (files.get_file, files.open_content, files.delete_file):
        with pytest.raises(NotFound) as missing:
            call(services, TENANT, theirs.id)
        assert missing.value.message == f"No such File object: {theirs.id}"
    assert blob_names(services) == [theirs.blob]


def _upload_expiring(services: Services, policy: object, **form: str) -> FileRecord:
    writer = services.blobs.new_writer()
    writer.write(LINE)
    return files.store_upload(
        services,
        TENANT,
        purpose=form.get("purpose", "batch"),
        filename="in.jsonl",
        writer=writer,
        expires_after=policy,
    )


def test_an_upload_s_expires_after_sets_its_expires_at(services: Services) -> None:
    policy = {"anchor": "created_at", "seconds": 7200}
    record = _upload_expiring(services, policy)
    assert record.expires_at == record.created_at + 7200
    # A purpose that otherwise never expires does when asked.
    vision = _upload_expiring(services, policy, purpose="vision")
    assert vision.expires_at == vision.created_at + 7200


def test_an_upload_s_expires_after_below_the_least_is_refused_and_leaves_no_bytes(
    make_services: MakeServices,
) -> None:
    services = make_services()
    with pytest.raises(InvalidRequest) as refused:
        _upload_expiring(services, {"anchor": "created_at", "seconds": 60})
    assert refused.value.param == "expires_after[seconds]"
    assert blob_names(services) == []
    # A server set up for tests accepts less.
    quick = make_services(min_expires_after_seconds=2)
    record = _upload_expiring(quick, {"anchor": "created_at", "seconds": 2})
    assert record.expires_at == record.created_at + 2
