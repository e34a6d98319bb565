"""File rows: created, read, listed in either order from a cursor, deleted; one tenant never
sees another's."""

from __future__ import annotations

from batchd.store.records import FileRecord
from batchd.store.store import Store
from tests.unit.store.builders import TENANT, file_record


def ids(page: list[FileRecord]) -> list[str]:
    return [record.id for record in page]


def test_a_file_reads_back_as_written(store: Store) -> None:
    record = file_record("file-1", expires_at=123)
    store.create_file(record)
    assert store.get_file(TENANT, "file-1") == record
    assert store.get_file(TENANT, "file-nope") is None
    assert store.all_blob_names() == {"blob-file-1"}


def test_file_pages_in_either_order_from_a_cursor(store: Store) -> None:
    for i in range(4):
        store.create_file(file_record(f"file-{i}"))
    store.create_file(file_record("file-out", purpose="batch_output"))

    page, more = store.list_files(TENANT, purpose=None, after=None, limit=2, order="desc")
    assert (ids(page), more) == (["file-out", "file-3"], True)
    page, more = store.list_files(TENANT, purpose=None, after="file-3", limit=2, order="desc")
    assert (ids(page), more) == (["file-2", "file-1"], True)
    page, more = store.list_files(TENANT, purpose=None, after="file-1", limit=2, order="desc")
    assert (ids(page), more) == (["file-0"], False)

    page, more = store.list_files(TENANT, purpose=None, after=None, limit=3, order="asc")
    assert (ids(page), more) == (["file-0", "file-1", "file-2"], True)
    page, more = store.list_files(TENANT, purpose=None, after="file-2", limit=3, order="asc")
    assert (ids(page), more) == (["file-3", "file-out"], False)

    page, more = store.list_files(TENANT, purpose="batch", after=None, limit=10, order="desc")
    assert (ids(page), more) == (["file-3", "file-2", "file-1", "file-0"], False)
    page, _ = store.list_files(TENANT, purpose="batch_output", after=None, limit=10, order="asc")
    assert ids(page) == ["file-out"]

    unknown = store.list_files(TENANT, purpose=None, after="file-nope", limit=10, order="desc")
    assert unknown == ([], False)


def test_a_deleted_file_is_gone_and_returned_once(store: Store) -> None:
    record = file_record("file-d")
    store.create_file(record)
    assert store.delete_file(TENANT, "file-d") == record
    assert store.get_file(TENANT, "file-d") is None
    assert store.delete_file(TENANT, "file-d") is None
    assert store.all_blob_names() == set()


def test_a_tenant_never_sees_another_s_files(store: Store) -> None:
    store.create_file(file_record("file-theirs", tenant="other"))
    store.create_file(file_record("file-mine"))
    assert store.get_file(TENANT, "file-theirs") is None
    page, _ = store.list_files(TENANT, purpose=None, after=None, limit=10, order="desc")
    assert ids(page) == ["file-mine"]
    foreign_cursor = store.list_files(
        TENANT, purpose=None, after="file-theirs", limit=10, order="desc"
    )
    assert foreign_cursor == ([], False)
    assert store.delete_file(TENANT, "file-theirs") is None
    assert store.get_file("other", "file-theirs") is not None, "not deleted by another tenant"
