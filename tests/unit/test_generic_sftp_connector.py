"""The generic_sftp connector: FERG-style response files, configurable formats, upload-only."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

from shared.esp import AccountConfig, BadRow, ConnectorContext
from shared.esp.generic_sftp import GenericSftpConnector, UploadOnlyError
from shared.model.messages import EventType, ResponseEvent

HEADER = "MessageType\turn\temail\tmailingId\tmailingName\ttimestamp\tlink\tbouncetype\tbouncereason"


def connector(**options: Any) -> GenericSftpConnector:
    return GenericSftpConnector(
        AccountConfig(esp="ferg", account="demo", connector="generic_sftp", options=options),
        ConnectorContext(http=cast(aiohttp.ClientSession, None)),
    )


def parse(tmp_path: Path, text: str, **options: Any) -> list[ResponseEvent | BadRow]:
    path = tmp_path / "x_FERGE_opens.txt"
    path.write_text(text, encoding="utf-8")
    return list(connector(**options).parse_response_file(path, "ferg/demo/responses/x_FERGE_opens.txt"))


def test_ferg_rows_map_to_events(tmp_path: Path) -> None:
    items = parse(
        tmp_path,
        f"{HEADER}\n"
        "Send\tk1\ta@x.com\tjob-1\tNov\t1795330000\t\t\t\n"
        "Click\tk1\ta@x.com\tjob-1\tNov\t1795330060\thttps://x.com/a\t\t\n"
        "Bounce\tk2\tb@x.com\tjob-1\tNov\t1795330001\t\thardbounce\tmailbox unknown\n"
        "Bounce\tk3\tc@x.com\tjob-1\tNov\t1795330002\t\tsoftbounce\tfull\n"
        "Unsubscription\tk1\ta@x.com\tjob-1\tNov\t1795330100\t\t\t\n",
    )
    assert all(isinstance(i, ResponseEvent) for i in items)
    events = [i for i in items if isinstance(i, ResponseEvent)]
    assert [e.type.value for e in events] == ["sent", "click", "bounce_hard", "bounce_soft", "unsubscribe"]
    assert events[1].url == "https://x.com/a"
    assert events[0].occurred_at == datetime.fromtimestamp(1795330000, UTC)
    assert events[2].extra == {"mailingName": "Nov", "bouncereason": "mailbox unknown"}
    again = [i for i in parse(tmp_path, f"{HEADER}\nSend\tk1\ta@x.com\tjob-1\tNov\t1795330000\t\t\t\n")]
    assert isinstance(again[0], ResponseEvent)
    assert again[0].event_id == events[0].event_id


def test_bad_rows_keep_their_line(tmp_path: Path) -> None:
    items = parse(
        tmp_path,
        f"{HEADER}\n"
        "Open\tk1\ta@x.com\tjob-1\tNov\t1795330000\t\t\t\n"
        "Teleport\tk1\ta@x.com\tjob-1\tNov\t1795330000\t\t\t\n"
        "Open\tk1\ta@x.com\tjob-1\tNov\tyesterday\t\t\t\n"
        "Bounce\tk1\ta@x.com\tjob-1\tNov\t1795330000\t\tweird\t\n"
        "Open\tk1\n",
    )
    bad = {i.line: i.error for i in items if isinstance(i, BadRow)}
    assert sorted(bad) == [3, 4, 5, 6]
    assert "unknown MessageType 'Teleport'" in bad[3]
    assert "not Unix seconds" in bad[4]
    assert "bounce type 'weird'" in bad[5]


def test_formats_are_configurable(tmp_path: Path) -> None:
    items = parse(
        tmp_path,
        "Type;Key;Campaign;When\nOPN;k9;job-2;22.11.2026 10:30\n",
        delimiter=";",
        columns={
            "message_type": "Type",
            "communication_key": "Key",
            "broadcast_id": "Campaign",
            "timestamp": "When",
        },
        message_types={"OPN": "open"},
        timestamp_format="%d.%m.%Y %H:%M",
        timezone="Europe/Rome",
    )
    (event,) = items
    assert isinstance(event, ResponseEvent)
    assert (event.type, event.broadcast_id, event.communication_key) == (EventType.OPEN, "job-2", "k9")
    assert event.occurred_at == datetime(2026, 11, 22, 9, 30, tzinfo=UTC)


async def test_there_is_no_send() -> None:
    c = connector()
    assert not c.can_send
    assert c.list_format.delimiter == "\t"
    assert c.list_format.file_name("job-1") == "job-1.txt"
    with pytest.raises(UploadOnlyError, match="upload_only"):
        await c.send("imp", job_for_send())


def test_upload_and_send_jobs_are_refused_for_file_only_esps() -> None:
    from services.uploader.core import ModeError, check_mode
    from tests.unit.test_messages import job

    with pytest.raises(ModeError, match="mode upload_only"):
        check_mode(job(), can_send=False, connector="generic_sftp")
    check_mode(job(mode="upload_only"), can_send=False, connector="generic_sftp")
    check_mode(job(), can_send=True, connector="generic")


def job_for_send() -> Any:
    from tests.unit.test_messages import job

    return job(mode="upload_only")
