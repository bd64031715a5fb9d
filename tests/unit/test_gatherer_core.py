"""The gatherer's rules without I/O: where a gathered file goes on the ESP's site, how a file is
named in logs, and the statuses a file's broadcasts get."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest

from services.gatherer import core
from shared.model.messages import ResponseFile, Stage, State

FILE = ResponseFile(
    esp="sandbox",
    account="demo",
    path="sandbox/demo/responses/2026-11-22/opens.csv",
    size=1234,
    mtime=datetime(2026, 11, 22, 9, 30, tzinfo=UTC),
)


@pytest.mark.parametrize(
    ("remote", "archive"),
    [
        ("sandbox/demo/responses/opens.csv", "sandbox/demo/archive/opens.csv"),
        ("sandbox/demo/responses/2026-11-22/opens.csv", "sandbox/demo/archive/opens.csv"),
        ("sandbox/demo/responses/name with spaces.csv", "sandbox/demo/archive/name with spaces.csv"),
    ],
)
def test_a_gathered_file_is_archived_under_its_own_name_in_the_accounts_archive(
    remote: str, archive: str
) -> None:
    assert core.archive_path(remote, "sandbox/demo", "archive") == archive


def test_a_file_is_named_in_logs_by_its_path_size_and_modification_time() -> None:
    assert core.file_key(FILE) == "sandbox/demo/responses/2026-11-22/opens.csv@1234:2026-11-22T09:30:00+00:00"


def test_each_broadcast_of_a_file_gets_one_running_gather_status_with_its_events() -> None:
    statuses = core.gather_statuses(FILE, Counter({"job-2": 5, "job-1": 40}), bad_rows=3)
    assert [(s.job_id, s.counts, s.detail) for s in statuses] == [
        (
            "job-1",
            {"events": 40, "bad_rows": 3},
            "40 events from sandbox/demo/responses/2026-11-22/opens.csv",
        ),
        ("job-2", {"events": 5, "bad_rows": 3}, "5 events from sandbox/demo/responses/2026-11-22/opens.csv"),
    ]
    assert {(s.stage, s.state, s.service) for s in statuses} == {(Stage.GATHER, State.RUNNING, "gatherer")}


def test_a_file_without_events_reports_to_no_broadcast() -> None:
    assert core.gather_statuses(FILE, Counter(), bad_rows=7) == []
