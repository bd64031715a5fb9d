"""A job's list file without servers: its header, its values as text, its bytes as the ESP gets
them, and the stream the uploader and ``espbridge job check`` both read it from."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest

from shared.esp import ListFormat
from shared.model.messages import InlineSelection
from shared.operations import lists, selection
from shared.operations.lists import ListStream
from tests.unit.test_messages import job


def test_the_header_follows_the_field_map_and_keeps_a_mapped_key_field_once() -> None:
    mapped_key = job(field_map={"email": "EmailAddress", "communication_key": "CommunicationKey"})
    assert lists.list_columns(mapped_key, "EmailAddress", "CommunicationKey") == [
        "EmailAddress",
        "CommunicationKey",
    ]
    assert lists.source_columns(mapped_key, "CommunicationKey") == ["email", "communication_key"]


def test_list_columns_add_the_key_field_and_need_an_email() -> None:
    j = job()
    assert lists.list_columns(j, "EmailAddress", "CommunicationKey") == [
        "EmailAddress",
        "FirstName",
        "CommunicationKey",
    ]
    assert lists.source_columns(j, "CommunicationKey") == ["email", "first_name", "communication_key"]
    with pytest.raises(lists.FieldMapError, match="'Email'"):
        lists.list_columns(j, "Email", "CommunicationKey")


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
    assert lists.text(value) == text


def test_rows_take_the_esps_delimiter_line_end_and_encoding() -> None:
    data = lists.encode_rows([["Email", "Name"], ["zoë@x.com", "a;b"]], ";", "\r\n", "latin-1")
    assert data == 'Email;Name\r\nzoë@x.com;"a;b"\r\n'.encode("latin-1")


def test_list_rows_are_quoted_as_rfc_4180() -> None:
    data = lists.encode_rows([["a@x.com", 'Jo "JJ", Jr', None, True]], ",", "\n", "utf-8")
    assert data == b'a@x.com,"Jo ""JJ"", Jr",,true\n'
    assert next(csv.reader(io.StringIO(data.decode()))) == ["a@x.com", 'Jo "JJ", Jr', "", "true"]


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
    assert lists.copy_can_write(fmt) is copy_writes_it


def test_suppression_values() -> None:
    assert selection.is_suppressed({"opted_out": "Yes"}, "opted_out")
    assert selection.is_suppressed({"opted_out": True}, "opted_out")
    assert not selection.is_suppressed({"opted_out": "0"}, "opted_out")
    assert not selection.is_suppressed({}, "opted_out")


def test_missing_columns_are_named_up_to_twenty_then_counted() -> None:
    assert selection.missing_text("crm.customers", {"b", "a"}) == "crm.customers has no column a, b"
    many = selection.missing_text("crm.customers", {f"c{i:04d}" for i in range(4997)})
    assert many.startswith("crm.customers has no column c0000, c0001,")
    assert many.endswith("c0019 and 4977 more")


OPTED_OUT = selection.Suppression("opted_out")
"""The rows' own flag column; no subscription state (no account)."""
INLINE = InlineSelection(
    rows=tuple({"email": f"p{i}@x.com", "ck": f"k{i}", "opted_out": i % 3 == 0} for i in range(1, 10))
)


async def inline_file(stream: ListStream) -> bytes:
    rows = selection.from_inline(INLINE, ["email", "ck"], OPTED_OUT, stream.tally)
    return b"".join([chunk async for chunk in stream.encoded(rows)])


async def test_a_limited_stream_holds_the_header_and_the_first_rows_as_the_whole_file_does() -> None:
    whole = ListStream(header=["Email", "Key"], fmt=ListFormat(delimiter=";"))
    first = ListStream(header=["Email", "Key"], fmt=ListFormat(delimiter=";"), limit=2)
    everything, head = await inline_file(whole), await inline_file(first)
    assert everything.startswith(head)
    assert head.decode().splitlines() == ["Email;Key", "p1@x.com;k1", "p2@x.com;k2"]
    assert (whole.rows, whole.tally.excluded, first.rows) == (6, 3, 2)


async def test_a_long_list_reports_its_progress_as_it_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lists, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(lists, "CHUNK_ROWS", 2)
    seen: list[tuple[int, int]] = []
    stream = ListStream(header=["Email", "Key"], fmt=ListFormat())

    async def progress() -> None:
        seen.append((stream.rows, stream.written))

    stream.progress = progress
    data = await inline_file(stream)
    assert [rows for rows, _ in seen] == [1, 3, 5, 6]
    assert seen[-1][1] == len(data)


async def test_an_empty_selection_is_an_error_that_counts_the_opted_out() -> None:
    stream = ListStream(header=["Email"], fmt=ListFormat())
    opted_out: Any = InlineSelection(rows=({"email": "a@x.com", "opted_out": True},))
    with pytest.raises(lists.EmptySelectionError, match=r"no recipients \(1 opted out\)"):
        async for _ in stream.encoded(selection.from_inline(opted_out, ["email"], OPTED_OUT, stream.tally)):
            pass
