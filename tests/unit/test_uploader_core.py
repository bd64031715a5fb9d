"""The uploader's rules without I/O: the status a job gets at each step of its upload (the list
file's rules are in tests/unit/test_list_file.py)."""

from __future__ import annotations

import pytest

from services.uploader import core
from shared.model.messages import ListUploaded, Stage, State
from tests.unit.test_messages import examples


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
