"""The connector kit on its own: options (merge, refusals), the row mapper (columns, times, BadRows)
and the stored-cursor codec. The REST caller meets a server in tests/integration/test_esp_http.py."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest
from pydantic import Field

from shared.esp import AccountConfig, BadRow, connector_for, deployteq, instiller, mailup, optimizely
from shared.esp.cursor import Count, CursorError, StoredCursor
from shared.esp.delimited import NotUtf8Error, Record, stream_records
from shared.esp.options import ConnectorOptions, DateFormat, Encoding, TimeFormats, TimeZone
from shared.esp.rows import (
    ISO,
    UNIX,
    Columns,
    Events,
    LocalTimes,
    ResponseTable,
    Row,
    aware_time,
    file_source,
    item_events,
)
from shared.model.errors import ConfigurationError
from shared.model.messages import EventType, ResponseEvent, event_id_for
from tests.fixtures.fake_esp import OFFLINE

# --- options ----------------------------------------------------------------------------------------


class Toy(ConnectorOptions):
    """Options of a connector that has one of every kind the kit checks."""

    MERGED: ClassVar = {"columns": {"email": "Email", "key": "Key"}, "states": {"1": "queued", "2": "done"}}
    ROLE_KEYED: ClassVar = ("columns",)

    columns: dict[str, str] = Field(default_factory=dict)
    states: dict[str, str] = Field(default_factory=dict)
    timezone: TimeZone = "UTC"
    date_format: DateFormat = "%Y-%m-%d"
    list_encoding: Encoding = "utf-8"
    list_delimiter: str = ";"


def toy(**options: Any) -> Toy:
    return Toy.of(AccountConfig(esp="toy", account="acme", options=options))


def test_options_given_in_part_are_laid_over_the_defaults() -> None:
    assert toy().columns == {"email": "Email", "key": "Key"}
    merged = toy(columns={"key": "CommunicationKey"}, states={"3": "failed"})
    assert merged.columns == {"email": "Email", "key": "CommunicationKey"}
    assert merged.states == {"1": "queued", "2": "done", "3": "failed"}


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"columns": {"colour": "Farbe"}}, "columns has unknown roles ['colour'] (known: ['email', 'key'])"),
        ({"timezone": "Mars/Olympus_Mons"}, "unknown time zone 'Mars/Olympus_Mons'"),
        ({"date_format": "%Q"}, "'%Q' cannot be read back"),
        ({"date_format": ""}, "date_format"),
        ({"list_encoding": "klingon"}, "'klingon' is not a known encoding"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_refused_options_are_a_configuration_error_naming_the_account(
    options: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ConfigurationError, match=r"^account toy/acme options: ") as info:
        toy(**options)
    assert complaint in str(info.value)


def test_the_list_format_comes_from_the_options_named_alike() -> None:
    fmt = toy().list_format(drop_folder="in", suffix=".txt")
    assert (fmt.delimiter, fmt.encoding, fmt.drop_folder, fmt.suffix) == (";", "utf-8", "in", ".txt")
    assert (fmt.email_field, fmt.key_field) == ("Email", "CommunicationKey")  # ListFormat's own


@pytest.mark.parametrize(
    ("connector", "options", "complaint"),
    [
        ("instiller", {"bogus": 1}, "bogus"),
        ("instiller", {"page_size": 0}, "page_size"),
        ("instiller", {"page_size": 5001}, "page_size"),
        ("instiller", {"requests_per_second": 0}, "requests_per_second"),
        ("instiller", {"list_identifier_template": "espbridge"}, "{job_id}"),
        ("instiller", {"list_identifier_template": "x_{job_id}_{other}"}, "job_id only"),
        ("instiller", {"export_types": ["output", "returned"]}, "not mapped"),
        ("instiller", {"export_type_map": {"open": "teleport"}}, "export_type_map"),
        ("instiller", {"import_states": {"complete": "finished"}}, "import_states"),
        ("instiller", {"timezone": "Mars/Olympus_Mons"}, "time zone"),
        ("instiller", {"paths": {"nope": "/x"}}, "unknown roles"),
        ("instiller", {"params": {"list": "api_key"}}, "params"),
        ("instiller", {"id_column": "EventId", "columns": {"id": "Id2"}}, "disagree"),
        ("instiller", {"date_format": "%Q"}, "date_format"),
        ("optimizely", {"page_size": 10000}, "page_size"),
        ("optimizely", {"campaign_action": "clone"}, "campaign_action"),
        ("optimizely", {"webhook_auth": "hmac"}, "webhook_auth"),
        ("optimizely", {"timezone": "Mars/Olympus"}, "time zone"),
        ("optimizely", {"response_columns": {"colour": "Farbe"}}, "unknown roles"),
        ("optimizely", {"message_types": {"Send": "teleport"}}, "message_types"),
        ("optimizely", {"chunk_size": 0}, "chunk_size"),
        ("optimizely", {"surprise": 1}, "surprise"),
        ("deployteq", {"bogus": 1}, "bogus"),
        ("deployteq", {"page_limit": 1001}, "page_limit"),
        ("deployteq", {"api_rate_per_s": 0}, "api_rate_per_s"),
        ("deployteq", {"pickup_timeout_s": 0}, "pickup_timeout_s"),
        ("deployteq", {"api_timezone": "Mars/Olympus_Mons"}, "api_timezone"),
        ("deployteq", {"brand": "a/b"}, "brand"),
        ("deployteq", {"staging_folder": "../up"}, "staging_folder"),
        ("deployteq", {"api_metrics": {"opens": "teleport"}}, "unknown event types"),
        ("deployteq", {"export_types": {"COMPLAINT": "grumble"}}, "unknown event types"),
        ("deployteq", {"export_columns": {"nope": "X"}}, "unknown roles"),
        ("deployteq", {"export_types": {"BOUNCE": "bounce"}}, "both the Events API"),
        ("deployteq", {"export_types": {"OPEN": "open"}}, "both the Events API"),
        ("deployteq", {"api_metrics": {"complaints": "complaint"}}, "both the Events API"),
        ("deployteq", {"export_timestamp_format": "%Q"}, "export_timestamp_format"),
        ("deployteq", {"list_encoding": "klingon"}, "list_encoding"),
        ("generic_sftp", {"message_types": {"OPN": "looked"}}, "unknown event types"),
        ("generic_sftp", {"timezone": "Mars/Olympus"}, "time zone"),
        ("generic_sftp", {"columns": {"colour": "x"}}, "columns has unknown roles"),
    ],
)
def test_every_connector_refuses_invalid_options_naming_the_account(
    connector: str, options: dict[str, Any], complaint: str
) -> None:
    account = AccountConfig(esp=connector, account="acme", connector=connector, options=options)
    with pytest.raises(ConfigurationError, match=f"{connector}/acme") as info:
        connector_for(account, OFFLINE)
    assert complaint in str(info.value)


# --- rows ---------------------------------------------------------------------------------------------

ROLES = {"email": "Email", "key": "Key", "when": "When", "kind": "Type"}


def table(tmp_path: Path, text: str | bytes, **given: Any) -> list[str | BadRow]:
    """The rows of a file read by a table of ROLES: ``kind:key`` of each, BadRows as they are."""
    path = tmp_path / "responses.csv"
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    settings: dict[str, Any] = {"delimiter": ";", "required": ("kind", ("key", "email")), **given}
    required = settings.pop("required")

    def event(row: Row) -> str | None:
        if row.get("kind") == "skip":
            return None
        if row.get("kind") == "bad":
            raise ValueError(f"a bad {row.column('kind')}")
        return f"{row.get('kind')}:{row.get('key') or row.get('email')}"

    return list(ResponseTable(ROLES, required, **settings).events(path, event))


@pytest.mark.parametrize("byte_exact", [False, True])
def test_a_table_maps_rows_by_role_and_keeps_bad_rows_with_their_line_and_bytes(
    tmp_path: Path, byte_exact: bool
) -> None:
    text = (
        "Type;Email;Key\nopen; a@x.com ;K1\n\nskip;b@x.com;K2\nbad;c@x.com;K3\nopen;d@x.com\nclick;e@x.com;\n"
    )
    assert table(tmp_path, text, byte_exact=byte_exact) == [
        "open:K1",
        BadRow(5, b"bad;c@x.com;K3", "a bad Type"),
        BadRow(6, b"open;d@x.com", "2 fields, want 3"),
        "click:e@x.com",
    ]


def test_a_header_without_a_required_column_is_one_bad_row(tmp_path: Path) -> None:
    assert table(tmp_path, "Type;Name\nopen;Ann\n") == [BadRow(1, b"Type;Name", "header lacks Key or Email")]
    assert table(tmp_path, "Email;Key\na@x.com;K1\n") == [BadRow(1, b"Email;Key", "header lacks Type")]
    assert table(tmp_path, "") == []


def test_a_row_not_in_the_tables_encoding_is_a_bad_row(tmp_path: Path) -> None:
    latin = "Type;Email;Key\nopen;josé@x.com;K1\n".encode("latin-1")
    (bad,) = table(tmp_path, latin)
    assert isinstance(bad, BadRow)
    assert (bad.line, bad.error) == (2, "not valid utf-8: byte 0xE9 in field 2, character 4")
    assert table(tmp_path, latin, encoding="latin-1") == ["open:K1"]


async def streamed(data: bytes) -> list[tuple[int, list[str]]]:
    """The records of ``data`` streamed a byte at a time (lines and characters split)."""

    async def blocks() -> AsyncIterator[bytes]:
        for i in range(len(data)):
            yield data[i : i + 1]

    return [record async for record in stream_records(blocks())]


async def test_a_streamed_list_file_is_split_into_records_by_its_quotes() -> None:
    data = '\ufeffa,b\r\n"x\r\ny",é\r\n\r\nlast,"q""q"'.encode()
    assert await streamed(data) == [
        (1, ["a,b\r\n"]),
        (2, ['"x\r\n', 'y",é\r\n']),
        (4, ["\r\n"]),
        (5, ['last,"q""q"']),  # the last line without its line end
    ]
    assert await streamed(b'a\n"b\nc\n') == [(1, ["a\n"]), (2, ['"b\n', "c\n"])]  # an unclosed quote
    with pytest.raises(NotUtf8Error) as info:
        await streamed(b"a\nb\nj\xf6rg\n")
    assert info.value.lines_read == 2


def test_columns_name_what_a_header_lacks_and_rows_read_times_by_role() -> None:
    columns = Columns(ROLES, ["When", "Email"])
    assert columns.missing(["when", "kind", ("key", "email"), ("key",)]) == ["Type", "Key"]
    row = columns.row(
        Record(7, b"", ["22.11.2026 11:00", "a@x.com"]),
        "utf-8",
        LocalTimes("%d.%m.%Y %H:%M", "Europe/Berlin"),
    )
    assert (row.line, row.get("email"), row.get("key"), row.column("kind")) == (7, "a@x.com", "", "Type")
    assert row.time("when") == datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    assert row.unmapped() == {}


@pytest.mark.parametrize(
    ("fmt", "zone", "value", "outcome"),
    [
        ("%Y-%m-%d %H:%M:%S", "Europe/London", "2026-07-01 10:00:00", datetime(2026, 7, 1, 9, tzinfo=UTC)),
        (
            "%Y-%m-%d %H:%M:%S",
            "Europe/London",
            "2026-10-25 01:30:00",
            datetime(2026, 10, 25, 0, 30, tzinfo=UTC),
        ),
        (
            "%Y-%m-%d %H:%M:%S%z",
            "Europe/London",
            "2026-07-01 10:00:00+0200",
            datetime(2026, 7, 1, 8, tzinfo=UTC),
        ),
        (UNIX, "UTC", "1795330000", datetime.fromtimestamp(1795330000, UTC)),
        (ISO, "Europe/Amsterdam", "2026-11-22T11:00:09", datetime(2026, 11, 22, 10, 0, 9, tzinfo=UTC)),
        (ISO, "Europe/Amsterdam", "2026-11-22T11:00:09+00:00", datetime(2026, 11, 22, 11, 0, 9, tzinfo=UTC)),
        ("%Y-%m-%d", "UTC", "", "empty When"),
        ("%Y-%m-%d", "UTC", "22.11.2026", "When '22.11.2026' does not match '%Y-%m-%d'"),
        (UNIX, "UTC", "yesterday", "When 'yesterday' is not Unix seconds"),
        (ISO, "UTC", "yesterday", "When 'yesterday' is not an ISO 8601 time"),
        # ISO 8601 with Z or an offset is read in every account, whatever its formats
        (UNIX, "Europe/Berlin", "2026-11-22T10:00:09Z", datetime(2026, 11, 22, 10, 0, 9, tzinfo=UTC)),
        (
            "%d.%m.%Y %H:%M",
            "Europe/Berlin",
            "2026-11-22 11:00:09+01:00",
            datetime(2026, 11, 22, 10, 0, 9, tzinfo=UTC),
        ),
        (
            "%d.%m.%Y %H:%M",
            "Europe/Berlin",
            "2026-11-22t10:00:09.5z",
            datetime(2026, 11, 22, 10, 0, 9, 500000, tzinfo=UTC),
        ),
        # a naive ISO time is no exception: it must fit one of the account's formats
        (UNIX, "Europe/Berlin", "2026-11-22T10:00:09", "When '2026-11-22T10:00:09' is not Unix seconds"),
        ("%d.%m.%Y", "UTC", "2026-11-22", "When '2026-11-22' does not match '%d.%m.%Y'"),
    ],
)
def test_local_times_are_read_in_the_accounts_format_and_zone(
    fmt: str, zone: str, value: str, outcome: datetime | str
) -> None:
    times = LocalTimes(fmt, zone)
    if isinstance(outcome, datetime):
        assert times.utc("When", value) == outcome
    else:
        with pytest.raises(ValueError, match=f"^{re.escape(outcome)}$"):
            times.utc("When", value)


MIXED = (UNIX, "%d.%m.%Y %H:%M", "%Y-%m-%d %H:%M:%S%z")
"""An account whose ESP writes its times three ways."""


@pytest.mark.parametrize(
    ("value", "outcome"),
    [
        ("1795330000", datetime.fromtimestamp(1795330000, UTC)),
        ("22.07.2026 10:30", datetime(2026, 7, 22, 8, 30, tzinfo=UTC)),  # CEST
        ("22.11.2026 10:30", datetime(2026, 11, 22, 9, 30, tzinfo=UTC)),  # CET
        ("25.10.2026 02:30", datetime(2026, 10, 25, 0, 30, tzinfo=UTC)),  # the repeated hour: its first
        ("2026-11-22 10:30:00+0000", datetime(2026, 11, 22, 10, 30, tzinfo=UTC)),
        ("2026-11-22T10:30:00-05:00", datetime(2026, 11, 22, 15, 30, tzinfo=UTC)),
        ("2026-11-22T10:30:00Z", datetime(2026, 11, 22, 10, 30, tzinfo=UTC)),
        (
            "2026-11-22T10:30:00",
            "When '2026-11-22T10:30:00' is in none of the formats Unix seconds, '%d.%m.%Y %H:%M', "
            "'%Y-%m-%d %H:%M:%S%z', nor ISO 8601 with a zone",
        ),
    ],
)
def test_an_account_with_several_formats_reads_each_time_by_the_first_that_fits(
    value: str, outcome: datetime | str
) -> None:
    times = LocalTimes(MIXED, "Europe/Berlin")
    if isinstance(outcome, datetime):
        assert times.utc("When", value) == outcome
    else:
        with pytest.raises(ValueError, match=f"^{re.escape(outcome)}$"):
            times.utc("When", value)


class Stamps(ConnectorOptions):
    """An account option of time formats, as a connector declares it."""

    stamps: TimeFormats = (UNIX,)


@pytest.mark.parametrize(
    ("given", "outcome"),
    [
        ({}, (UNIX,)),
        ({"stamps": "%d.%m.%Y"}, ("%d.%m.%Y",)),  # one format as a plain string, as before
        ({"stamps": ["iso", "unix", "%Y-%m-%d %H:%M:%S%z"]}, (ISO, UNIX, "%Y-%m-%d %H:%M:%S%z")),
        ({"stamps": []}, "at least 1 item"),
        ({"stamps": ["unix", "%Q"]}, "'%Q' cannot be read back"),
        ({"stamps": ["unix", ""]}, "at least 1 character"),
        ({"stamps": 5}, "valid tuple"),
    ],
)
def test_time_formats_are_one_or_a_list_each_checked_when_read(
    given: dict[str, Any], outcome: tuple[str, ...] | str
) -> None:
    account = AccountConfig(esp="toy", account="acme", options=given)
    if isinstance(outcome, tuple):
        assert Stamps.of(account).stamps == outcome
    else:
        with pytest.raises(ConfigurationError, match=re.escape(outcome)):
            Stamps.of(account)


@pytest.mark.parametrize(
    ("value", "outcome"),
    [
        ("2026-11-22T10:00:03Z", datetime(2026, 11, 22, 10, 0, 3, tzinfo=UTC)),
        ("2026-11-22t11:00:03.5+01:00", datetime(2026, 11, 22, 10, 0, 3, 500000, tzinfo=UTC)),
        ("2026-11-22 10:00:03z", datetime(2026, 11, 22, 10, 0, 3, tzinfo=UTC)),
        ("2026-11-22T12:00:03+01", datetime(2026, 11, 22, 11, 0, 3, tzinfo=UTC)),
        ("2026-11-22T10:00:03", "has no time zone offset"),
        ("22/11/2026", "is not an ISO 8601 time"),
        (1795330000, "is not an ISO 8601 time"),
        ("", "empty created"),
    ],
)
def test_aware_times_need_an_offset(value: Any, outcome: datetime | str) -> None:
    if isinstance(outcome, datetime):
        assert aware_time("created", value) == outcome
    else:
        with pytest.raises(ValueError, match=outcome):
            aware_time("created", value)


def test_items_become_events_or_bad_rows_numbered_from_the_page() -> None:
    events = Events(AccountConfig(esp="esp", account="acme"))

    def event(line: int, item: Any) -> ResponseEvent | None:
        if item == "skip":
            return None
        if not isinstance(item, dict):
            raise ValueError(f"not an object but {type(item).__name__}")
        return events.make(
            broadcast_id="job-1",
            type=EventType.OPEN,
            occurred_at=datetime(2026, 11, 22, tzinfo=UTC),
            source=file_source("esp/acme/./r.csv", line),
            recipient=item["key"],
            communication_key=item["key"],
        )

    made = item_events([{"key": "K1"}, "skip", [1, 2], {1, 2}], event, what="opens item", first_line=11)
    first, *bad = made
    assert isinstance(first, ResponseEvent)
    assert (first.source.name, first.source.line, first.extra) == ("esp/acme/r.csv", 11, {})
    assert first.event_id == event_id_for(
        "esp", broadcast_id="job-1", recipient="K1", event_type="open", occurred_at=first.occurred_at
    )
    assert bad == [
        BadRow(13, b"[1,2]", "opens item: not an object but list"),
        BadRow(14, b"{1, 2}", "opens item: not an object but set"),  # no JSON value: its repr
    ]
    esp_id = events.make(
        broadcast_id="job-1",
        type=EventType.OPEN,
        occurred_at=datetime(2026, 11, 22, tzinfo=UTC),
        source=file_source("r.csv", 1),
        esp_event_id="acme:e1",
        email="a@x.com",
    )
    assert esp_id.event_id == event_id_for("esp", esp_event_id="acme:e1")


# --- cursors -------------------------------------------------------------------------------------------


class Position(StoredCursor):
    """A cursor of the kind connectors store."""

    start: date = Field(alias="from")
    page: Count
    offsets: dict[str, Count]
    mailings: list[Count] | None = None


def test_a_cursor_is_versioned_json_written_compactly_and_read_back() -> None:
    position = Position(start=date(2026, 11, 21), page=2, offsets={"opens": 3})
    text = position.dump()
    assert text == '{"v":1,"from":"2026-11-21","page":2,"offsets":{"opens":3},"mailings":null}'
    assert Position.load(text) == position


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('{"v":2,"from":"2026-11-21","page":2,"offsets":{}}', "a cursor of version 2, not 1"),
        ('{"ep":"Views","page":3}', "a cursor of version None, not 1"),
        ('{"v":1,"from":"2026-11-21","page":true,"offsets":{}}', "page missing or wrong"),
        ('{"v":1,"from":"2026-11-21","page":-1,"offsets":{}}', "page missing or wrong"),
        ('{"v":1,"from":"2026-11-21","page":1,"offsets":{"a":1.5}}', "offsets.a missing or wrong"),
        ('{"v":1,"from":"yesterday","page":1,"offsets":{}}', "from missing or wrong"),
        ('{"v":1,"page":1,"offsets":{}}', "from missing or wrong"),
        ("[1]", "not a JSON object but list"),
        ("{", "not JSON"),
    ],
)
def test_a_cursor_of_another_version_or_shape_is_refused(text: str, complaint: str) -> None:
    with pytest.raises(CursorError, match=complaint):
        Position.load(text)


def test_an_unreadable_cursor_is_none_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="shared.esp.cursor")
    assert Position.read(None, "esp/acme") is None
    assert Position.read('{"v":2}', "esp/acme", job_id="job-1") is None
    (record,) = caplog.records
    assert record.getMessage() == "unreadable pull cursor, pulling the broadcast from the start"
    assert (record.__dict__["account"], record.__dict__["job_id"]) == ("esp/acme", "job-1")


@pytest.mark.parametrize(
    ("cursor", "stored"),
    [
        (instiller.Cursor, '{"v":1,"next":"open","offsets":{"output":3,"open":1}}'),
        (mailup.Cursor, '{"v":1,"ep":"Views","page":3}'),
        (deployteq.Cursor, '{"v":1,"from":"2026-11-21","to":"2026-12-22","i":2,"offsets":{"sends":5}}'),
        (
            optimizely.Cursor,
            '{"v":2,"batch":5001,"mailings":[8004],"recipient_list":3001,"pos":2,"sweeps":{"8004:hardbounce":200},'
            '"unsubscribes":{"high_water":"2026-11-22T10:00:00+00:00","high_seen":["K1|8004|x"],'
            '"offset":0,"top":null,"top_seen":[]}}',
        ),
    ],
)
def test_the_connectors_stored_cursors_are_read_and_written_as_before(
    cursor: type[StoredCursor], stored: str
) -> None:
    assert cursor.load(stored).dump() == stored


def test_an_older_optimizely_cursor_without_the_seen_lists_is_still_read() -> None:
    older = (
        '{"v":1,"batch":5001,"mailings":null,"pos":0,"offsets":{},'
        '"unsubscribes":{"high_water":null,"offset":4,"top":"2026-11-22T10:00:00+00:00"}}'
    )
    state = optimizely.Cursor.load(older)
    assert (state.unsubscribes.offset, state.unsubscribes.high_seen, state.unsubscribes.top_seen) == (
        4,
        [],
        [],
    )
    assert orjson.loads(state.dump())["unsubscribes"]["top"] == "2026-11-22T10:00:00+00:00"
    with pytest.raises(CursorError, match=r"unsubscribes\.top"):
        optimizely.Cursor.load(older.replace("2026-11-22T10:00:00+00:00", "noon"))
