"""The uploader's rules without I/O: the list file's header and bytes as the ESP gets them, and the
status a job gets at each step of its upload."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from services.uploader import core
from shared.esp import ListFormat
from shared.model.messages import ListUploaded, Stage, State
from tests.unit.test_messages import examples, job


def test_the_header_follows_the_field_map_and_keeps_a_mapped_key_field_once() -> None:
    mapped_key = job(field_map={"email": "EmailAddress", "communication_key": "CommunicationKey"})
    assert core.list_columns(mapped_key, "EmailAddress", "CommunicationKey") == [
        "EmailAddress",
        "CommunicationKey",
    ]
    assert core.source_columns(mapped_key, "CommunicationKey") == ["email", "communication_key"]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, ""),
        (False, "false"),
        (7, "7"),
        (Decimal("1E+20"), "100000000000000000000"),
        (Decimal("12.50"), "12.50"),
        (date(2026, 11, 22), "2026-11-22"),
        (datetime(2026, 11, 22, 9, 30, tzinfo=UTC), "2026-11-22T09:30:00+00:00"),
    ],
)
def test_a_value_is_written_as_postgresql_would_write_it(value: object, text: str) -> None:
    assert core.text(value) == text


def test_rows_take_the_esps_delimiter_line_end_and_encoding() -> None:
    data = core.encode_rows([["Email", "Name"], ["zoë@x.com", "a;b"]], ";", "\r\n", "latin-1")
    assert data == 'Email;Name\r\nzoë@x.com;"a;b"\r\n'.encode("latin-1")


@pytest.mark.parametrize(
    ("fmt", "copy_writes_it"),
    [
        (ListFormat(), True),
        (ListFormat(delimiter="\t"), True),
        (ListFormat(line_terminator="\r\n"), False),
        (ListFormat(encoding="latin-1"), False),
        (ListFormat(encoding="UTF8"), True),
        (ListFormat(delimiter="||"), False),
        (ListFormat(delimiter='"'), False),
    ],
)
def test_postgresql_copy_writes_the_list_only_for_formats_it_writes_byte_for_byte(
    fmt: ListFormat, copy_writes_it: bool
) -> None:
    assert core.copy_can_write(fmt) is copy_writes_it


def test_an_upload_in_progress_reports_the_upload_stage_running() -> None:
    status = core.status("job-1", State.RUNNING, "writing sandbox/demo/drop/job-1.csv")
    assert (status.job_id, status.stage, status.state, status.service) == (
        "job-1",
        Stage.UPLOAD,
        State.RUNNING,
        "uploader",
    )
    assert status.detail == "writing sandbox/demo/drop/job-1.csv"
    assert len(core.status("job-1", State.FAILED, "x" * 5000).detail) == 2000


def test_a_finished_upload_reports_its_rows_exclusions_and_bytes() -> None:
    upload = next(m for m in examples() if isinstance(m, ListUploaded))
    status = core.uploaded_status(upload)
    assert (status.stage, status.state) == (Stage.UPLOAD, State.DONE)
    assert status.detail == "10 recipients in sandbox/demo/drop/job-1.csv"
    assert status.counts == {"rows": 10, "excluded": 2, "bytes": 1234}


def test_an_invalid_job_with_a_usable_id_gets_a_failed_status_with_the_reason() -> None:
    status = core.rejected(b'{"job_id": "job-7", "esp": 3}', "not a valid BroadcastJob: esp")
    assert status is not None
    assert (status.job_id, status.stage, status.state) == ("job-7", Stage.UPLOAD, State.FAILED)
    assert status.detail == "not a valid BroadcastJob: esp"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"esp": "sandbox"}',
        b'{"job_id": 7}',
        b'{"job_id": "../etc/passwd"}',
        b'{"job_id": ""}',
    ],
)
def test_an_invalid_job_without_a_usable_id_has_nobody_to_report_to(body: bytes) -> None:
    assert core.job_id_of(body) is None
    assert core.rejected(body, "invalid") is None
