"""The status reporter: every status is published; a service that drives a job's stages also
records it in control.jobs, after Kafka acknowledged it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import pytest

from services.uploader.handlers import Uploader, handle_job
from shared.infra.db import jobs
from shared.model.errors import InvalidMessageError
from shared.model.messages import BroadcastStatus, Message, Stage, State
from shared.runtime.runtime import Runtime
from shared.runtime.status import StatusReporter


class Journal:
    """What happened, in order: published statuses and recorded ones."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, str]] = []

    async def publish(self, message: Message) -> None:
        self.steps.append(("published", cast(BroadcastStatus, message).detail))

    async def publish_many(self, messages: Sequence[Message]) -> None:
        self.steps += [("published", cast(BroadcastStatus, m).detail) for m in messages]

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[str]:
        yield "conn"

    async def record_status(self, conn: Any, status: BroadcastStatus) -> None:
        self.steps.append(("recorded", status.detail))


@pytest.fixture
def journal(monkeypatch: pytest.MonkeyPatch) -> Journal:
    journal = Journal()
    monkeypatch.setattr(jobs, "record_status", journal.record_status)
    return journal


def status(detail: str) -> BroadcastStatus:
    return BroadcastStatus(
        job_id="job-1", stage=Stage.UPLOAD, state=State.RUNNING, detail=detail, service="uploader"
    )


def reporter(journal: Journal, *, records: bool) -> StatusReporter:
    return StatusReporter(cast(Runtime, journal), cast(Any, journal) if records else None)


async def test_a_service_that_drives_the_job_records_each_status_after_publishing_it(
    journal: Journal,
) -> None:
    statuses = reporter(journal, records=True)
    await statuses.report(status("writing"))
    await statuses.report_all([status("a"), status("b")])
    assert journal.steps == [
        ("published", "writing"),
        ("recorded", "writing"),
        ("published", "a"),
        ("published", "b"),
        ("recorded", "a"),
        ("recorded", "b"),
    ]


async def test_the_uploader_publishes_a_rejected_jobs_status_only(journal: Journal) -> None:
    """control.jobs holds the valid job of that id, if any, not the message that was rejected."""
    none: Any = None
    uploader = Uploader(
        none, cast(Runtime, journal), cast(Any, journal), none, reporter(journal, records=True), none
    )
    with pytest.raises(InvalidMessageError):
        await handle_job(b'{"job_id": "job-1", "esp": 3}', uploader)
    [(step, detail)] = journal.steps
    assert step == "published"
    assert detail.startswith("not a valid BroadcastJob")


async def test_a_service_without_the_jobs_table_publishes_only(journal: Journal) -> None:
    statuses = reporter(journal, records=False)
    await statuses.report(status("one"))
    await statuses.report_all([status("two")])
    assert journal.steps == [("published", "one"), ("published", "two")]
