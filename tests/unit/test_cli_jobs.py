"""The job commands' rules and output without servers: what the check says of a send time and of
the recipients, its report, when a broadcast has ended, and the live view of ``--follow``."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rich.console import Console

from cli import main as cli_main
from cli.checks import check_report
from cli.history import follow_renderable, list_rows
from shared.infra.db.jobs import JobSummary
from shared.model.messages import BroadcastStatus, Stage, State
from shared.operations.checking import Finding, JobCheck, ListHead, Verdict, count_finding, send_time_finding
from shared.operations.jobs import JobView
from shared.operations.selection import Counted
from tests.unit.test_messages import job

NOW = datetime(2026, 11, 22, 9, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("changes", "verdict", "detail"),
    [
        ({"mode": "upload_only"}, Verdict.OK, "none: an upload_only job is uploaded and imported, not sent"),
        ({}, Verdict.OK, "as soon as the list is imported"),
        ({"send_at": NOW + timedelta(days=2, hours=3)}, Verdict.OK, "2026-11-24 12:30:00 UTC, in 2 d 3 h"),
        ({"send_at": NOW + timedelta(minutes=5)}, Verdict.OK, "2026-11-22 09:35:00 UTC, in 5 min 0 s"),
        ({"send_at": NOW}, Verdict.FAILED, "send_at 2026-11-22 09:30:00 UTC is in the past (0 s ago)"),
        (
            {"send_at": NOW - timedelta(hours=1, minutes=2)},
            Verdict.FAILED,
            "send_at 2026-11-22 08:28:00 UTC is in the past (1 h 2 min ago)",
        ),
    ],
)
def test_a_send_time_must_still_be_ahead(changes: dict[str, Any], verdict: Verdict, detail: str) -> None:
    assert send_time_finding(job(**changes), NOW) == Finding("send time", verdict, detail)


def test_a_send_time_weeks_ahead_passes_the_check_whatever_the_esp_can_schedule() -> None:
    # Optimizely's batch sending has no schedule: the monitor holds every send until its time
    weeks = job(send_at=NOW + timedelta(weeks=3))
    assert send_time_finding(weeks, NOW).verdict is Verdict.OK
    assert send_time_finding(job(send_at=NOW - timedelta(minutes=1)), NOW).verdict is Verdict.FAILED


@pytest.mark.parametrize(
    ("counted", "verdict", "detail"),
    [
        (
            Counted(96970, 0, False, by_state=3030, state_checked=True),
            Verdict.OK,
            "96,970 to upload, 3,030 excluded: 3,030 by the subscription state, "
            "none as opted out (the selection has no opted_out column)",
        ),
        (
            Counted(96970, 30, True, by_state=3000, state_checked=True),
            Verdict.OK,
            "96,970 to upload, 3,030 excluded: 3,000 by the subscription state, 30 as opted out (opted_out)",
        ),
        (
            Counted(96970, 3030, True),
            Verdict.OK,
            "96,970 to upload, 3,030 excluded: none by the subscription state (the CRM keeps none), "
            "3,030 as opted out (opted_out)",
        ),
        (
            Counted(12, 0, False, state_checked=True),
            Verdict.OK,
            "12 to upload, nobody excluded: 0 by the subscription state, "
            "none as opted out (the selection has no opted_out column)",
        ),
        (Counted(0, 4, True), Verdict.FAILED, "the selection has no recipients (4 opted out)"),
        (
            Counted(0, 1, True, by_state=3, state_checked=True),
            Verdict.FAILED,
            "the selection has no recipients (3 suppressed by the subscription state, 1 opted out)",
        ),
    ],
)
def test_the_recipients_are_counted_and_nobody_left_is_a_failure(
    counted: Counted, verdict: Verdict, detail: str
) -> None:
    assert count_finding(counted, "opted_out") == Finding("recipients", verdict, detail)


def test_the_check_report_marks_every_check_and_shows_the_list_files_first_rows() -> None:
    check = JobCheck(
        job(),
        (
            Finding("account", Verdict.OK, "sandbox/demo: the generic connector (sends)"),
            Finding(
                "size", Verdict.OK, "1,234 bytes of the 1,048,576 the producer's max_request_size allows"
            ),
        ),
        Counted(2, 0, True),
        ListHead("sandbox/demo/drop/job-1.csv", 'EmailAddress,FirstName\na@x.com,"Ann, Jr"\nb@x.com,Bo\n', 2),
    )
    assert check_report(check).splitlines() == [
        "job job-1 → sandbox/demo, list 'November newsletter', message 'msg-42'",
        "  ok  account  sandbox/demo: the generic connector (sends)",
        "  ok  size     1,234 bytes of the 1,048,576 the producer's max_request_size allows",
        "the header and the first 2 rows of sandbox/demo/drop/job-1.csv, as the ESP will get them:",
        "  EmailAddress,FirstName",
        '  a@x.com,"Ann, Jr"',
        "  b@x.com,Bo",
        "the job can be published (nothing was uploaded, published or sent)",
    ]


def summary(stage: str, state: str, mode: str = "upload_and_send") -> JobSummary:
    return JobSummary(
        job_id="job-1",
        esp="sandbox",
        account="demo",
        list_name="November newsletter",
        message="msg-42",
        mode=mode,
        send_at=None,
        requested_by="ops",
        stage=stage,
        state=state,
        detail="",
        counts={},
        created_at=NOW,
        updated_at=NOW,
        send_requested_at=None,
        esp_import_id=None,
        esp_send_id=None,
        cancel_requested_at=None,
        cancel_requested_by=None,
        cancel_reason=None,
    )


IMPORTED = [BroadcastStatus(job_id="job-1", stage=Stage.IMPORT, state=State.DONE, at=NOW)]
IMPORTED_ONLY = "imported (an upload_only job is not sent)"


@pytest.mark.parametrize(
    ("stage", "state", "mode", "history", "ended", "outcome"),
    [
        ("upload", "running", "upload_and_send", [], False, None),
        ("import", "done", "upload_and_send", IMPORTED, False, None),
        ("send", "queued", "upload_and_send", IMPORTED, False, None),
        ("send", "done", "upload_and_send", IMPORTED, True, "sent"),
        ("import", "done", "upload_only", IMPORTED, True, IMPORTED_ONLY),
        ("send", "cancelled", "upload_only", IMPORTED, True, IMPORTED_ONLY),
        ("upload", "failed", "upload_and_send", [], True, "failed at upload"),
        ("send", "cancelled", "upload_and_send", IMPORTED, True, "cancelled at send"),
        ("upload", "cancelled", "upload_only", [], True, "cancelled at upload"),
    ],
)
def test_a_broadcast_ends_when_sent_failed_or_cancelled(
    stage: str, state: str, mode: str, history: list[BroadcastStatus], ended: bool, outcome: str | None
) -> None:
    view = JobView(summary(stage, state, mode), history, None)
    assert view.ended is ended
    if outcome is not None:
        assert (view.outcome, view.succeeded) == (outcome, outcome in ("sent", IMPORTED_ONLY))


def status(stage: Stage, state: State, detail: str = "", **counts: int) -> BroadcastStatus:
    return BroadcastStatus(job_id="job-1", stage=stage, state=state, detail=detail, counts=counts, at=NOW)


def test_the_live_view_shows_each_stage_with_its_progress_and_the_funnel() -> None:
    view = JobView(
        summary("send", "running"),
        [
            status(Stage.UPLOAD, State.RUNNING, "writing sandbox/demo/drop/job-1.csv", bytes=3_500_000),
            status(Stage.UPLOAD, State.DONE, "96970 recipients", rows=96970, excluded=3030, bytes=7_100_000),
            status(Stage.IMPORT, State.DONE, "import imp-1", rows_valid=96960, rows_invalid=10),
            status(Stage.SEND, State.RUNNING, "send snd-1"),
        ],
        {"sent": 48485, "delivered": 40000, "opens": 12},
    )
    console = Console(record=True, width=140, force_terminal=False)
    console.print(follow_renderable(view))
    lines = [" ".join(line.split()) for line in console.export_text().splitlines()]
    assert lines[0] == "job job-1 → sandbox/demo, list 'November newsletter', message 'msg-42'"
    stages = {line.split()[0]: line for line in lines[4:8]}
    assert stages["upload"].startswith("upload done")
    assert "96,970 rows, 7.1 MB" in stages["upload"]
    assert "96,960 imported, 10 refused" in stages["import"]
    assert stages["send"].startswith("send running")
    assert stages["send"].endswith("send snd-1")
    assert "48,485 of 96,970 sends" in stages["load"]
    assert lines[-1] == "response funnel: sent=48485 delivered=40000 opens=12"


def test_the_list_shows_one_row_per_job_under_its_header() -> None:
    rows = list_rows([summary("import", "failed", mode="upload_only")])
    assert rows[0] == [
        "JOB ID",
        "CREATED",
        "ESP/ACCOUNT",
        "LIST",
        "SEND AT",
        "STAGE",
        "STATE",
        "UPDATED",
        "DETAIL",
    ]
    assert rows[1][:8] == [
        "job-1",
        "2026-11-22 09:30:00",
        "sandbox/demo",
        "November newsletter",
        "upload only",
        "import",
        "failed",
        "2026-11-22 09:30:00",
    ]


def test_an_unexpected_error_reaches_the_operator_as_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(_: Any) -> int:
        raise RuntimeError("the disk is full\nand more")

    monkeypatch.setattr(cli_main, "configure", lambda *_: None)  # the test's own logging stays
    monkeypatch.setitem(cli_main.COMMANDS, ("job", "list"), broken)
    level = logging.getLogger("aiokafka").level
    try:
        code = cli_main.main(["job", "list"])
    finally:
        logging.getLogger("aiokafka").setLevel(level)
    assert code == 1
    assert (
        capsys.readouterr().err == "espbridge: unexpected error (RuntimeError): the disk is full and more\n"
    )
