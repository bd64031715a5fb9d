"""The monitor's rules without I/O: how long it waits between polls, when a send time is missed,
and the status a job gets from what the ESP says about its import, send and cancel."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from services.monitor import core
from shared.esp import ImportState, ImportStatus, SendState, SendStatus
from shared.esp.base import CancelOutcome, CancelResult
from shared.infra.db.broadcast_work import Step
from shared.model.messages import CancelRequest, Stage, State

SEND_AT = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def test_polls_wait_longer_each_time_up_to_the_bound() -> None:
    waits = [core.poll_delay(0.5, 30.0, polls) for polls in range(14)]
    assert waits[:3] == pytest.approx([0.5, 0.8, 1.28])
    assert all(a <= b for a, b in itertools.pairwise(waits))
    assert max(waits) == 30.0
    assert waits[-3:] == [30.0, 30.0, 30.0]  # the bound holds for as long as the ESP takes
    assert core.poll_delay(0.5, 30.0, 10_000) == 30.0  # however many polls, no overflow


def test_a_failed_step_waits_its_back_off_and_at_least_the_esps_retry_after() -> None:
    assert core.retry_delay(0.5, 30.0, 0, None) == 0.5
    assert core.retry_delay(0.5, 30.0, 0, 4.0) == 4.0
    assert core.retry_delay(0.5, 30.0, 20, 4.0) == 30.0


@pytest.mark.parametrize(
    ("late_s", "sent"), [(-3600, True), (0, True), (899, True), (900, True), (901, False), (86400, False)]
)
def test_a_send_time_passed_by_more_than_the_grace_is_not_sent_late(late_s: int, sent: bool) -> None:
    missed = core.send_time_missed(SEND_AT, SEND_AT + timedelta(seconds=late_s), 900)
    assert (missed is None) is sent
    if not sent:
        assert missed == (
            f"send time 2026-11-23T09:00:00Z passed {late_s}s before the broadcast could be sent "
            "(more than send_at_grace_s, 900s): not sent late"
        )
    assert core.send_time_missed(None, SEND_AT, 0) is None  # no send time: sent when ready


def test_a_broadcast_waiting_for_its_send_time_says_which() -> None:
    assert core.waiting_detail(SEND_AT) == "waiting for its send time 2026-11-23T09:00:00Z"


def test_steps_report_on_the_stage_they_belong_to() -> None:
    assert {s for s in Step if core.stage_of(s) is Stage.IMPORT} == {Step.START_IMPORT, Step.IMPORT_STATUS}


def test_a_stage_past_its_deadline_says_what_did_not_end_and_the_last_error() -> None:
    assert core.timeout_detail(Step.IMPORT_STATUS, "imp-1", 3600, "") == "import imp-1 not done after 3600s"
    assert core.timeout_detail(Step.SEND_STATUS, "s-1", 21600, "HTTP 503") == (
        "send s-1 not finished after 21600s (last error: HTTP 503)"
    )
    assert core.timeout_detail(Step.FIND_SEND, None, 60, "") == "send not made after 60s"


def test_a_cancel_says_who_and_why_and_what_the_esp_answered() -> None:
    cancel = CancelRequest(job_id="j-1", reason="wrong segment", requested_at=SEND_AT, requested_by="ana")
    assert core.cancel_detail(cancel) == "cancelled by ana: wrong segment"
    assert core.cancel_detail(CancelRequest(job_id="j-1", requested_at=SEND_AT)) == "cancelled"
    answers = {
        outcome: core.cancel_answer(CancelResult(outcome, "as the ESP put it"), "s-9")
        for outcome in CancelOutcome
    }
    assert answers == {
        CancelOutcome.CANCELLED: "the ESP cancelled send s-9: as the ESP put it",
        CancelOutcome.TOO_LATE: "too late to cancel send s-9, the ESP sent it already: as the ESP put it",
        CancelOutcome.NOT_SUPPORTED: "send s-9 cannot be cancelled, the ESP has no cancel: as the ESP put it",
    }


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
    send = SendStatus("s-1", SendState.SENT, recipients=96970)
    assert core.send_counts(send) == {"recipients": 96970}
    assert core.send_detail(send) == "send s-1 sent"
