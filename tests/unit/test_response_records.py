"""Reading broken response files record by record: every record keeps its line and original bytes,
a bad record never stops the ones after it, and memory stays bounded on a huge line."""

from __future__ import annotations

import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from pydantic import SecretStr

from shared.esp import AccountConfig, BadRow, ConnectorContext
from shared.esp.delimited import KEEP_BYTES, check_line_encoding, read_records, undecodable
from shared.esp.generic import RESPONSE_HEADER, GenericConnector
from shared.esp.generic_sftp import GenericSftpConnector
from shared.model.errors import ConfigurationError
from shared.model.messages import ResponseEvent


def records(tmp_path: Path, data: bytes, **kwargs: Any) -> list[tuple[int, bytes, list[str] | None]]:
    path = tmp_path / "f.csv"
    path.write_bytes(data)
    return [(r.line, r.raw, r.fields) for r in read_records(path, **kwargs)]


def test_bom_crlf_and_quoted_line_breaks_keep_lines_and_bytes(tmp_path: Path) -> None:
    data = b'\xef\xbb\xbfa,b\r\n1,"two\r\nlines"\r\n\r\n3,4'
    assert records(tmp_path, data) == [
        (1, b"a,b", ["a", "b"]),
        (2, b'1,"two\r\nlines"', ["1", "two\r\nlines"]),
        (4, b"", []),
        (5, b"3,4", ["3", "4"]),
    ]


def test_invalid_bytes_stay_in_their_record(tmp_path: Path) -> None:
    data = "a,b\nJosé,1\nok,2\n".encode("latin-1")
    (_, (line, raw, fields), last) = records(tmp_path, data)
    assert (line, raw) == (2, "José,1".encode("latin-1"))
    assert fields is not None
    assert undecodable(fields, "UTF-8") == "not valid UTF-8: byte 0xE9 in field 1, character 4"
    assert last == (3, b"ok,2", ["ok", "2"])
    latin = records(tmp_path, data, encoding="latin-1")
    assert latin[1][2] == ["José", "1"]
    assert undecodable(["José", "1"], "latin-1") is None


def test_a_truncated_last_line_is_returned_as_read(tmp_path: Path) -> None:
    assert records(tmp_path, b'a,b,c\n1,2,3\n4,"fi')[1:] == [
        (2, b"1,2,3", ["1", "2", "3"]),
        (3, b'4,"fi', ["4", "fi"]),
    ]


def test_a_10_mb_line_becomes_one_bounded_record_and_reading_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    huge = b"x" * (10 * 1024 * 1024)
    path.write_bytes(b"a,b\n1,2\n" + huge + b",y\n3,4\n")
    tracemalloc.start()
    try:
        got = list(read_records(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(r.line, r.fields) for r in got] == [(1, ["a", "b"]), (2, ["1", "2"]), (3, None), (4, ["3", "4"])]
    big = got[2]
    assert big.raw == huge[:KEEP_BYTES]
    assert f"record of {len(huge) + 3} bytes is over the 131072-byte limit" in big.error
    assert peak < 4 * 1024 * 1024, f"reading a 10 MB line peaked at {peak} bytes"


def test_an_unclosed_quote_swallows_a_bounded_amount(tmp_path: Path) -> None:
    lines = b"".join(b"%d,row\n" % n for n in range(3, 20_000))
    got = records(tmp_path, b'a,b\n1,"open\n' + lines, max_record_bytes=1000)
    assert got[0] == (1, b"a,b", ["a", "b"])
    line, raw, fields = got[1]
    assert (line, fields) == (2, None)
    assert raw.startswith(b'1,"open\n3,row\n')
    assert len(raw) <= 1001
    # reading resumes at the line after the one that crossed the limit; all later rows are parsed
    assert got[-1] == (19_999, b"19999,row", ["19999", "row"])
    assert all(f is not None for _, _, f in got[2:])


def test_a_lone_carriage_return_is_a_bad_record_not_a_dead_file(tmp_path: Path) -> None:
    got = records(tmp_path, b"a,b\n1,x\ry\n2,z\n")
    assert (got[1][0], got[1][2]) == (2, None)
    assert got[2] == (3, b"2,z", ["2", "z"])


def test_only_ascii_compatible_encodings_are_accepted() -> None:
    for name in ("utf-8", "latin-1", "cp1252", "iso-8859-15"):
        check_line_encoding(name)
    with pytest.raises(ValueError, match="not ASCII-compatible"):
        check_line_encoding("utf-16")
    with pytest.raises(ValueError, match="unknown encoding"):
        check_line_encoding("klingon")
    with pytest.raises(ConfigurationError, match="utf-16"):
        GenericSftpConnector(
            AccountConfig(esp="f", account="a", connector="generic_sftp", options={"encoding": "utf-16"}),
            ConnectorContext(http=cast(aiohttp.ClientSession, None)),
        )


# --- the connectors' parsers on the same inputs ----------------------------------------------------

GENERIC_HEADER = ",".join(RESPONSE_HEADER)


async def parse_generic(tmp_path: Path, data: bytes) -> list[ResponseEvent | BadRow]:
    path = tmp_path / "r.csv"
    path.write_bytes(data)
    account = AccountConfig(
        esp="sandbox", account="demo", api_url="http://127.0.0.1:1/api", token=SecretStr("t")
    )
    async with aiohttp.ClientSession() as http:
        return list(
            GenericConnector(account, ConnectorContext(http)).parse_response_file(path, "s/d/responses/r.csv")
        )


@pytest.mark.parametrize(
    ("occurred", "outcome"),
    [
        ("2026-11-22T10:00:00Z", datetime(2026, 11, 22, 10, tzinfo=UTC)),
        ("2026-11-22T11:00:00+01:00", datetime(2026, 11, 22, 10, tzinfo=UTC)),
        ("2026-11-22 10:00:00.000+00:00", datetime(2026, 11, 22, 10, tzinfo=UTC)),
        ("2026-11-22T10:00:00", "has no time zone"),
        ("22/11/2026 10:00", "is not an ISO 8601 time"),
        ("1795330000", "is not an ISO 8601 time"),
    ],
)
async def test_generic_dates_need_iso_8601_with_a_zone(
    tmp_path: Path, occurred: str, outcome: object
) -> None:
    (item,) = await parse_generic(
        tmp_path, f"{GENERIC_HEADER}\ne1,job-1,m,k,a@x.com,open,,{occurred}\n".encode()
    )
    if isinstance(outcome, datetime):
        assert isinstance(item, ResponseEvent)
        assert item.occurred_at == outcome
    else:
        assert isinstance(item, BadRow)
        assert str(outcome) in item.error
        assert item.line == 2


async def test_generic_rejects_latin_1_lines_and_keeps_their_bytes(tmp_path: Path) -> None:
    good = b"e1,job-1,m,k1,a@x.com,open,,2026-11-22T10:00:00Z\n"
    bad = "e2,job-1,m,k2,josé@x.com,open,,2026-11-22T10:00:00Z".encode("latin-1")
    items = await parse_generic(tmp_path, GENERIC_HEADER.encode() + b"\n" + good + bad + b"\n")
    assert isinstance(items[0], ResponseEvent)
    assert items[1] == BadRow(3, bad, "not valid UTF-8: byte 0xE9 in field 5, character 4")


FERG_HEADER = "MessageType\turn\temail\tmailingId\ttimestamp"


def test_generic_sftp_reads_its_configured_encoding_and_zone(tmp_path: Path) -> None:
    conn = GenericSftpConnector(
        AccountConfig(
            esp="f",
            account="a",
            connector="generic_sftp",
            options={
                "encoding": "latin-1",
                "timestamp_format": "%Y-%m-%d %H:%M:%S",
                "timezone": "Europe/Amsterdam",
            },
        ),
        ConnectorContext(http=cast(aiohttp.ClientSession, None)),
    )
    path = tmp_path / "x_FERGE_y.txt"
    rows = "Open\tk1\tjosé@x.com\tjob-1\t2026-11-22 11:00:00\nOpen\tk2\tb@x.com\tjob-1\t22.11.2026\n"
    path.write_bytes(f"{FERG_HEADER}\n{rows}".encode("latin-1"))
    first, second = conn.parse_response_file(path, "f/a/responses/x_FERGE_y.txt")
    assert isinstance(first, ResponseEvent)
    assert (first.email, first.occurred_at) == ("josé@x.com", datetime(2026, 11, 22, 10, tzinfo=UTC))
    assert isinstance(second, BadRow)
    assert "does not match '%Y-%m-%d %H:%M:%S'" in second.error
