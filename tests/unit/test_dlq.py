"""Dead letters without servers: ids, filters, what is replayable, and a bad response row kept by
the gatherer parsing again under a fixed connector configuration."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

from cli.dlq import list_rows
from cli.output import one_line
from services.gatherer.originals import MAX_RECORD_BYTES, RecordReader, row_letter, with_originals
from shared.esp import AccountConfig, BadRow, ConnectorContext
from shared.esp.generic_sftp import GenericSftpConnector
from shared.model import deadletters as dlq
from shared.model.errors import InvalidMessageError
from shared.model.messages import DeadLetter, EventSource, ResponseEvent, ResponseFile

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
HEADER = "MessageType\turn\temail\tmailingId\tmailingName\ttimestamp\tlink\tbouncetype\tbouncereason"
REMOTE = "ferg/demo/responses/x_FERGE_opens.txt"


def connector(**options: Any) -> GenericSftpConnector:
    return GenericSftpConnector(
        AccountConfig(esp="ferg", account="demo", connector="generic_sftp", options=options),
        ConnectorContext(http=cast(aiohttp.ClientSession, None)),
    )


def gathered(path: Path, conn: GenericSftpConnector) -> list[ResponseEvent | DeadLetter]:
    """What the gatherer publishes for a local response file: events and dead letters."""
    file = ResponseFile(esp="ferg", account="demo", path=REMOTE, size=path.stat().st_size, mtime=NOW)
    with RecordReader(path) as records:
        return [
            item if isinstance(item, ResponseEvent) else row_letter(file, *item, records.header_text())
            for item in with_originals(conn.parse_response_file(path, REMOTE), records)
        ]


def reparsed(letter: DeadLetter, conn: GenericSftpConnector, tmp_path: Path) -> list[ResponseEvent | BadRow]:
    """What ``dlq replay`` gets from parsing a file row's dead letter again."""
    path = tmp_path / "replay"
    path.write_bytes(dlq.replay_file(letter))
    return [
        dlq.at_original_line(i, letter) if isinstance(i, ResponseEvent) else i
        for i in conn.parse_response_file(path, REMOTE)
    ]


def test_letter_ids_and_since_times_are_read_or_refused() -> None:
    assert dlq.parse_id(" 2:017 ") == "2:17"
    with pytest.raises(InvalidMessageError):
        dlq.parse_id("17")
    assert dlq.parse_since("2h", NOW) == NOW - timedelta(hours=2)
    assert dlq.parse_since("7d", NOW) == NOW - timedelta(days=7)
    assert dlq.parse_since("2026-11-22T10:00:00", NOW) == datetime(2026, 11, 22, 10, tzinfo=UTC)
    with pytest.raises(InvalidMessageError):
        dlq.parse_since("yesterday", NOW)


def test_a_bad_row_keeps_its_original_bytes_and_loads_once_the_configuration_fits(tmp_path: Path) -> None:
    path = tmp_path / "x_FERGE_opens.txt"
    path.write_bytes(
        (
            f"{HEADER}\r\n"
            "Send\tk1\ta@x.com\tjob-1\tNov\t22.11.2026 10:00\t\t\t\r\n"
            'Open\tk2\t"b@x.com"\tjob-1\t"Nov\r\nsecond line"\t22.11.2026 10:01\t\t\t\r\n'
            "Teleport\tk3\tc@x.com\tjob-1\tNov\t22.11.2026 10:02\t\t\t\r\n"
        ).encode()
    )
    wrong = gathered(path, connector())  # timestamps are not Unix seconds
    letters = [x for x in wrong if isinstance(x, DeadLetter)]
    assert [x.source.line for x in letters] == [2, 3, 5]
    assert letters[1].payload == b'Open\tk2\t"b@x.com"\tjob-1\t"Nov\r\nsecond line"\t22.11.2026 10:01\t\t\t'
    assert letters[0].context == {"esp": "ferg", "account": "demo", "header": f"{HEADER}\r\n"}
    assert all(dlq.not_replayable(x, "") is None for x in letters)

    fixed = connector(timestamp_format="%d.%m.%Y %H:%M", timezone="Europe/Berlin")
    again = [reparsed(x, fixed, tmp_path) for x in letters]
    assert [[i.source.line for i in items if isinstance(i, ResponseEvent)] for items in again] == [
        [2],
        [3],
        [],
    ]
    opened = again[1][0]
    assert isinstance(opened, ResponseEvent)
    assert opened.email == "b@x.com"
    assert opened.extra["mailingName"] == "Nov\r\nsecond line"
    assert opened.occurred_at == datetime(2026, 11, 22, 9, 1, tzinfo=UTC)
    still_bad = again[2]
    assert isinstance(still_bad[0], BadRow)
    assert "Teleport" in still_bad[0].error
    # The events are those a correctly configured gatherer makes of the file: the same ids.
    direct = [x for x in gathered(path, fixed) if isinstance(x, ResponseEvent)]
    assert [e.event_id for e in direct] == [
        e.event_id for items in again for e in items if isinstance(e, ResponseEvent)
    ]


def test_a_header_that_does_not_fit_keeps_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "x_FERGE_opens.txt"
    path.write_text("Kind\turn\tmailingId\twhen\nSend\tk1\tjob-1\t1795330000\nOpen\tk1\tjob-1\t1795330001\n")
    (header,) = gathered(path, connector())
    assert isinstance(header, DeadLetter)
    assert header.source.line == 1
    assert header.payload == path.read_bytes().removesuffix(b"\n")
    fixed = connector(columns={"message_type": "Kind", "timestamp": "when"})
    events = reparsed(header, fixed, tmp_path)
    assert [(e.type.value, e.source.line) for e in events if isinstance(e, ResponseEvent)] == [
        ("sent", 2),
        ("open", 3),
    ]


def test_a_record_too_large_to_keep_is_not_replayable(tmp_path: Path) -> None:
    path = tmp_path / "x_FERGE_opens.txt"
    wide = "N" * (MAX_RECORD_BYTES // 4)  # csv's field limit is 128 KiB: four wide fields
    path.write_text(f"{HEADER}\nSend\tk1\ta@x.com\tjob-1\t{wide}\tsoon\t{wide}\t{wide}\t{wide}\n")
    (big,) = gathered(path, connector())
    assert isinstance(big, DeadLetter)
    assert "header" not in big.context
    assert big.payload.startswith(b"Send\tk1")  # the connector's rendering of the row
    assert (
        dlq.not_replayable(big, "")
        == "the row's original bytes or the file's header were not kept; gather the file again"
    )


def test_a_letter_is_replayable_only_where_a_replay_can_succeed() -> None:
    def letter(kind: Any, name: str, error_class: str = "E", **context: str) -> DeadLetter:
        return DeadLetter(
            source=EventSource(
                kind=kind,
                name=name,
                partition=0 if kind == "topic" else None,
                offset=0 if kind == "topic" else None,
            ),
            payload=b"{}",
            error_class=error_class,
            message="m",
            context=context,
        )

    assert dlq.not_replayable(letter("topic", "p.broadcast.jobs.v1"), "p.") is None
    assert dlq.origin_topic(letter("topic", "p.broadcast.jobs.v1"), "p.") is not None
    assert "not a topic of this deployment" in (
        dlq.not_replayable(letter("topic", "q.broadcast.jobs.v1"), "p.") or ""
    )
    assert "dead-letter topic" in (dlq.not_replayable(letter("topic", "p.deadletter.v1"), "p.") or "")
    auth = dlq.not_replayable(letter("webhook", "webhook:mailup/a", "WebhookAuthError"), "p.")
    assert auth is not None
    assert "failed authentication" in auth
    assert "older version" in (dlq.not_replayable(letter("file", "a/b/responses/f.csv"), "p.") or "")
    assert dlq.not_replayable(letter("api", "mailup/a", broadcast="job-1"), "p.") is not None


def test_letters_are_filtered_by_broadcast_and_listed_with_their_state() -> None:
    job = DeadLetter(
        source=EventSource(kind="topic", name="p.broadcast.jobs.v1", partition=1, offset=4),
        payload=b'{"job_id": "job-7", "esp": "x"}',
        error_class="SelectionError",
        message="table or view crm.nope does not exist\nsecond line",
        service="uploader",
        at=NOW,
    )
    item = dlq.Letter(0, 12, job, "f")
    assert item.id == "0:12"
    assert dlq.broadcast_of(job) == "job-7"
    assert dlq.matches(item, dlq.Filters(broadcast="job-7", service="uploader", kind="topic"), "new")
    assert not dlq.matches(item, dlq.Filters(broadcast="job-8"), "new")
    assert not dlq.matches(item, dlq.Filters(since=NOW + timedelta(seconds=1)), "new")
    assert not dlq.matches(item, dlq.Filters(state="replayed"), "new")
    assert dlq.state_text(item, None, "p.") == "new"
    done = dlq.Replay("replayed", "", 0, "p.broadcast.jobs.v1:2:9", 1, NOW, NOW)
    assert dlq.state_text(item, done, "p.") == "replayed 2026-11-22 12:00:00 to p.broadcast.jobs.v1:2:9"
    assert dlq.state_text(item, None, "p.", replay_of="0:3") == "new (replay of 0:3 failed again)"
    rows = list_rows([(item, "new")])
    assert rows[1] == [
        "0:12",
        "2026-11-22 12:00:00",
        "uploader",
        "topic p.broadcast.jobs.v1 [1]@4",
        "SelectionError",
        "new",
        "table or view crm.nope does not exist second line",
    ]
    assert one_line("x" * 200, 10) == "x" * 9 + "…"
