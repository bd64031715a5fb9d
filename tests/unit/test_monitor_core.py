"""The monitor's rules without I/O: how long it waits between polls, and the status a job gets from
what the ESP says about its import and send."""

from __future__ import annotations

import itertools

import pytest

from services.monitor import core
from shared.esp import ImportState, ImportStatus, SendState, SendStatus
from shared.model.messages import Stage, State


def test_polls_wait_longer_each_time_up_to_the_bound() -> None:
    waits = list(itertools.islice(core.backoff(0.5, 30.0), 14))
    assert waits[:3] == pytest.approx([0.5, 0.8, 1.28])
    assert all(a <= b for a, b in itertools.pairwise(waits))
    assert max(waits) == 30.0
    assert waits[-3:] == [30.0, 30.0, 30.0]  # the bound holds for as long as the ESP takes


def test_a_status_names_the_stage_and_the_monitor_and_keeps_its_counts() -> None:
    status = core.status("job-1", Stage.SEND, State.RUNNING, "send s-1 sending", recipients=96970)
    assert (status.job_id, status.stage, status.state, status.service) == (
        "job-1",
        Stage.SEND,
        State.RUNNING,
        "monitor",
    )
    assert status.counts == {"recipients": 96970}
    assert len(core.status("job-1", Stage.IMPORT, State.FAILED, "e" * 3000).detail) == 2000


def test_an_import_the_esp_failed_is_a_rejection_with_its_first_five_reasons() -> None:
    errors = tuple(f"line {n}: invalid email" for n in range(2, 9))
    why = core.import_failure(ImportStatus("imp-1", ImportState.FAILED, errors=errors))
    assert why == "the ESP rejected the list (import imp-1): " + "; ".join(errors[:5])
    assert core.import_failure(ImportStatus("imp-1", ImportState.FAILED)) == (
        "the ESP rejected the list (import imp-1): no reason given"
    )


def test_an_import_done_that_kept_no_row_is_a_rejection_too() -> None:
    imp = ImportStatus(
        "imp-2", ImportState.DONE, rows_valid=0, rows_invalid=3, errors=("line 2: invalid email",)
    )
    assert core.import_failure(imp) == (
        "the ESP refused all 3 rows of the list (import imp-2): line 2: invalid email"
    )


def test_an_import_that_kept_rows_is_sent_and_its_detail_names_the_refused_ones() -> None:
    partly = ImportStatus("imp-3", ImportState.DONE, rows_valid=97, rows_invalid=3, errors=("line 5: bad",))
    assert core.import_failure(partly) is None
    assert core.import_detail(partly) == "import imp-3: the ESP refused 3 rows: line 5: bad"
    assert core.import_counts(partly) == {"rows_valid": 97, "rows_invalid": 3}
    whole = ImportStatus("imp-4", ImportState.DONE, rows_valid=100)
    assert core.import_failure(whole) is None
    assert core.import_detail(whole) == "import imp-4"


def test_a_send_reports_its_recipients() -> None:
    assert core.send_counts(SendStatus("s-1", SendState.SENT, recipients=96970)) == {"recipients": 96970}
