"""Broken response files through the real gatherer and loader: in every file the good rows load,
each bad row becomes a dead letter naming the file and line with the row's original bytes, and
the file is archived. One gatherer and one loader serve every file of the module (five ESP
accounts: the default ``sandbox`` ESP's format, and ``generic_sftp`` with its defaults, with a
configured encoding and time zone, with several time formats, and with the broadcast in the file
name)."""

from __future__ import annotations

import codecs
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from shared.esp.delimited import KEEP_BYTES
from shared.infra.db import connect
from shared.infra.kafka import ensure_topics
from shared.infra.settings import PostgresSettings
from shared.model.messages import DeadLetter, ResponseEvent
from shared.model.topics import Topic
from tests.fixtures.deployment import Deployment, place
from tests.fixtures.jobs import record_jobs
from tests.fixtures.kafka import produce, read_until
from tests.fixtures.processes import stop
from tests.fixtures.servers import Servers
from tests.fixtures.waits import wait_for
from tools.scratch import create_database, delete_topics, drop_database

JOB = "job-files"
NOBODY = "job-nobody"
HUGE = b"h" * (10 * 1024 * 1024)
GENERIC_HEADER = b"EventId,BroadcastId,MessageId,CommunicationKey,Email,EventType,Url,OccurredAt"
FERG_HEADER = b"MessageType\turn\temail\tmailingId\tmailingName\ttimestamp\tlink\tbouncetype\tbouncereason"


def row(eid: str, kind: str = "open", when: str = "2026-11-22T10:00:00Z", broadcast: str = JOB) -> bytes:
    """A row of the generic ESP's response format."""
    return f"{eid},{broadcast},m,k-{eid},{eid}@x.com,{kind},,{when}".encode()


def ferg_row(kind: str, key: str, when: str = "1795330000", email: str = "") -> bytes:
    """A row of the generic_sftp (FERG) response format."""
    return f"{kind}\t{key}\t{email or key + '@x.com'}\t{JOB}\tNov\t{when}\t\t\t".encode()


@dataclass(frozen=True)
class Case:
    """One response file: its content, the lines that must load, the lines that must be dead letters."""

    account: str
    name: str
    content: bytes
    good: frozenset[int]
    bad: dict[int, str] = field(default_factory=dict)
    """Line → a text the dead letter's message must contain."""

    def line(self, number: int) -> bytes:
        """Physical line ``number`` as in the file (without its line end), bounded as dead letters are."""
        raw = self.content.split(b"\n")[number - 1].removesuffix(b"\r")
        return raw[:KEEP_BYTES]


def lines(*rows: bytes, eol: bytes = b"\n", final: bool = True) -> bytes:
    return eol.join(rows) + (eol if final else b"")


CASES = {
    c.name: c
    for c in [
        # --- the sandbox ESP (docs/generic-esp.md: UTF-8, comma, ISO 8601 UTC times) -------------
        Case("sandbox", "bom.csv", codecs.BOM_UTF8 + lines(GENERIC_HEADER, row("bom1")), frozenset({2})),
        Case(
            "sandbox",
            "latin1.csv",
            lines(
                GENERIC_HEADER,
                row("lat1"),
                "lat2,job-files,m,k,josé@x.com,open,,2026-11-22T10:00:00Z".encode("latin-1"),
                row("lat3"),
            ),
            frozenset({2, 4}),
            {3: "not valid UTF-8: byte 0xE9 in field 5"},
        ),
        Case(
            "sandbox",
            "crlf.csv",
            lines(GENERIC_HEADER, row("crlf1"), row("crlf2"), row("crlf3", kind="teleport"), eol=b"\r\n"),
            frozenset({2, 3}),
            {4: "unknown EventType 'teleport'"},
        ),
        Case(
            "sandbox",
            "quoted.csv",
            lines(
                GENERIC_HEADER,
                b'q1,job-files,"two\nlines, one field",k-q1,q1@x.com,click,"https://x.com/?a=1,2",2026-11-22T10:00:00Z',
                row("q2"),
            ),
            frozenset({2, 4}),
        ),
        Case(
            "sandbox",
            "ragged.csv",
            lines(GENERIC_HEADER, row("rag1"), b"rag2,job-files,m", row("rag3") + b",surplus", row("rag4")),
            frozenset({2, 5}),
            {3: "3 fields, want 8", 4: "9 fields, want 8"},
        ),
        Case(
            "sandbox",
            "truncated.csv",
            lines(GENERIC_HEADER, row("cut1"), b'cut2,job-files,"m', final=False),
            frozenset({2}),
            {3: "3 fields, want 8"},
        ),
        Case(
            "sandbox",
            "types.csv",
            lines(GENERIC_HEADER, row("typ1", kind="teleport"), row("typ2", kind="OPEN"), row("typ3")),
            frozenset({4}),
            {2: "unknown EventType 'teleport'", 3: "unknown EventType 'OPEN'"},
        ),
        Case(
            "sandbox",
            "dates.csv",
            lines(
                GENERIC_HEADER,
                row("dat1", when="2026-11-22T10:00:00"),
                row("dat2", when="22/11/2026 10:00"),
                row("dat3", when="2026-11-22T11:00:00+01:00"),
            ),
            frozenset({4}),
            {2: "has no time zone", 3: "is not an ISO 8601 time"},
        ),
        Case(
            "sandbox",
            "huge.csv",
            lines(GENERIC_HEADER, row("big1"), HUGE, row("big3")),
            frozenset({2, 4}),
            {3: f"record of {len(HUGE) + 1} bytes is over the 131072-byte limit"},
        ),
        Case(
            "sandbox",
            "unknown.csv",
            lines(GENERIC_HEADER, row("unk1", broadcast=NOBODY), row("unk2")),
            frozenset({3}),
        ),
        Case("sandbox", "back\\..\\..\\escape.csv", lines(GENERIC_HEADER, row("esc1")), frozenset({2})),
        Case("sandbox", "odd name ü;$(x) €.csv", lines(GENERIC_HEADER, row("odd1")), frozenset({2})),
        Case("sandbox", "new\nline.csv", lines(GENERIC_HEADER, row("nl1")), frozenset({2})),
        # --- generic_sftp with its defaults: UTF-8, tab, Unix seconds -----------------------------
        Case(
            "ferg",
            "x_FERGE_bom_crlf.txt",
            codecs.BOM_UTF8
            + lines(FERG_HEADER, ferg_row("Send", "fb1"), ferg_row("Open", "fb2"), eol=b"\r\n"),
            frozenset({2, 3}),
        ),
        Case(
            "ferg",
            "x_FERGE_latin1.txt",
            lines(
                FERG_HEADER,
                ferg_row("Open", "fl1"),
                "Open\tfl2\tjosé@x.com\tjob-files\tNov\t1795330000\t\t\t".encode("latin-1"),
            ),
            frozenset({2}),
            {3: "not valid utf-8: byte 0xE9 in field 3"},
        ),
        Case(
            "ferg",
            "x_FERGE_quoted.txt",
            lines(
                FERG_HEADER,
                b'Open\tfq1\tfq1@x.com\tjob-files\t"two\nlines"\t1795330000\t\t\t',
                ferg_row("Open", "fq2"),
            ),
            frozenset({2, 4}),
        ),
        Case(
            "ferg",
            "x_FERGE_ragged.txt",
            lines(
                FERG_HEADER,
                ferg_row("Open", "fr1"),
                b"Open\tfr2",
                ferg_row("Open", "fr3") + b"\tsurplus",
                ferg_row("Open", "fr4"),
            ),
            frozenset({2, 5}),
            {3: "2 fields, want 9", 4: "10 fields, want 9"},
        ),
        Case(
            "ferg",
            "x_FERGE_truncated.txt",
            lines(FERG_HEADER, ferg_row("Open", "ft1"), ferg_row("Open", "ft2")[:20], final=False),
            frozenset({2}),
            {3: "fields, want 9"},
        ),
        Case(
            "ferg",
            "x_FERGE_types.txt",
            lines(FERG_HEADER, ferg_row("Teleport", "fy1"), ferg_row("Open", "fy2")),
            frozenset({3}),
            {2: "unknown MessageType 'Teleport'"},
        ),
        Case(
            "ferg",
            "x_FERGE_dates.txt",
            lines(
                FERG_HEADER,
                ferg_row("Open", "fd1", when="2026-11-22T10:00:00Z"),  # ISO 8601 with a zone: any account
                ferg_row("Open", "fd2", when="1795330000"),
                ferg_row("Open", "fd3", when="2026-11-22T10:00:00"),  # naive: must fit the account's format
            ),
            frozenset({2, 3}),
            {4: "'2026-11-22T10:00:00' is not Unix seconds"},
        ),
        Case(
            "ferg",
            "x_FERGE_huge.txt",
            lines(FERG_HEADER, ferg_row("Open", "fh1"), HUGE, ferg_row("Open", "fh3")),
            frozenset({2, 4}),
            {3: "over the 131072-byte limit"},
        ),
        # --- generic_sftp configured for Latin-1 and local times in Europe/Amsterdam --------------
        Case(
            "ferg_latin",
            "x_FERGE_local.txt",
            lines(
                FERG_HEADER,
                ferg_row("Open", "ll1", when="2026-11-22 11:00:00", email="josé@x.com")
                .decode()
                .encode("latin-1"),
                ferg_row("Open", "ll2", when="2026-07-01 12:00:00"),
                ferg_row("Open", "ll3", when="22.11.2026"),
            ),
            frozenset({2, 3}),
            {4: "does not match '%Y-%m-%d %H:%M:%S'"},
        ),
        # --- generic_sftp whose ESP writes its times several ways, local ones in Europe/Amsterdam -----
        Case(
            "ferg_times",
            "x_FERGE_mixed.txt",
            lines(
                FERG_HEADER,
                ferg_row("Open", "mt1", when="1795330000"),
                ferg_row("Open", "mt2", when="22.11.2026 11:00:00"),  # CET
                ferg_row("Open", "mt3", when="01.07.2026 12:00:00"),  # CEST
                ferg_row("Open", "mt4", when="2026-11-22T10:00:00Z"),
                ferg_row("Open", "mt5", when="2026-11-22T05:00:00-05:00"),
                ferg_row("Open", "mt6", when="2026-11-22 10:00:00"),
            ),
            frozenset({2, 3, 4, 5, 6}),
            {7: "'2026-11-22 10:00:00' is in none of the formats Unix seconds, '%d.%m.%Y %H:%M:%S'"},
        ),
        # --- generic_sftp whose ESP names the broadcast in the file name, not in the rows -----------
        Case(
            "ferg_named",
            f"{JOB}_FERGE_opens.txt",
            lines(
                b"MessageType\turn\temail\ttimestamp",
                b"Open\tfn1\tfn1@x.com\t1795330000",
                b"Click\tfn2\tfn2@x.com\t1795330000",
                b"Open\t\t\t1795330000",
            ),
            frozenset({2, 3}),
            {4: "neither a communication key nor an email"},
        ),
    ]
}
UNREADABLE = b"caf\xe9.csv"
ACCOUNTS: dict[str, tuple[str, dict[str, Any]]] = {
    # case account → (esp, connector options)
    "sandbox": ("sandbox", {}),
    "ferg": ("generic_sftp", {}),
    "ferg_latin": (
        "generic_sftp",
        {"encoding": "latin-1", "timestamp_format": "%Y-%m-%d %H:%M:%S", "timezone": "Europe/Amsterdam"},
    ),
    "ferg_times": (
        "generic_sftp",
        {"timestamp_format": ["unix", "%d.%m.%Y %H:%M:%S"], "timezone": "Europe/Amsterdam"},
    ),
    "ferg_named": (
        "generic_sftp",
        {"attribution": "file_name", "file_name_pattern": r"(?P<broadcast_id>.+)_FERGE_[a-z]+\.txt"},
    ),
}


@dataclass
class Outcome:
    """What the pipeline made of every file."""

    roots: dict[str, str]
    """Case account → its folder on the SFTP site."""
    local: Path
    letters: list[DeadLetter]
    rows: dict[str, dict[str, Any]]
    """Loaded rows of responses.events by their source (``file:<remote path>:<line>``)."""
    replayed: dict[str, Any] | None
    """The row of the unknown broadcast's event, loaded by replaying its dead letter."""
    gatherer_log: str

    def remote(self, case: Case) -> str:
        return f"{self.roots[case.account]}/responses/{case.name}"


@pytest.fixture(scope="module")
async def outcome(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Outcome]:
    unique = os.urandom(5).hex()
    kafka = servers.kafka_for(unique)
    async with AsyncExitStack() as cleanup:
        pg = await create_database(servers.pg, f"test_{unique}")
        cleanup.push_async_callback(drop_database, servers.pg, pg.database)
        cleanup.push_async_callback(delete_topics, kafka, kafka.topic_prefix)
        await ensure_topics(kafka)
        deployment = Deployment(servers, kafka, pg, tmp_path_factory.mktemp("bad-files"), unique)

        entries, roots = [], {}
        for key, (esp, options) in ACCOUNTS.items():
            account = f"{key.replace('_', '')}{unique}"
            entry = deployment.offline_account(esp, account)
            entry["options"] = {**entry.get("options", {}), **options}
            entries.append(entry)
            roots[key] = f"{esp}/{account}"
            await record_jobs(pg, esp, account, JOB)
            deployment.response_folders(esp, account)
        accounts = deployment.accounts_file(entries)
        for case in CASES.values():
            place(servers.sftp_local_root / roots[case.account] / "responses", case.name, case.content)
        sandbox_responses = servers.sftp_local_root / roots["sandbox"] / "responses"
        place(sandbox_responses, UNREADABLE, lines(GENERIC_HEADER, row("cafe1")))

        env = deployment.env(accounts, ESPBRIDGE_GATHERER_SCAN_INTERVAL_S="0.5")
        good = sum(len(c.good) for c in CASES.values())
        bad = (
            sum(len(c.bad) for c in CASES.values()) + 2
        )  # + the unknown broadcast's event, the unreadable name
        with ExitStack() as stack:
            procs = [deployment.start(stack, service, env) for service in ("gatherer", "loader")]
            await wait_for(lambda: loaded_rows(pg, good), timeout_s=90, what=f"{good} good rows loaded")
            records = await read_until(kafka, Topic.DEADLETTER, lambda rs: len(rs) >= bad, timeout_s=60)
            letters = [DeadLetter.from_json(r.value or b"") for r in records]
            archive = {key: servers.sftp_local_root / root / "archive" for key, root in roots.items()}
            await wait_for(
                lambda: all((archive[c.account] / c.name).exists() for c in CASES.values()),
                timeout_s=30,
                what="every file archived",
            )
            rows = await events_by_source(pg)
            # The unknown broadcast becomes known; replaying its dead letter (what `espbridge dlq
            # replay` does: the payload back to its topic) loads the event.
            unknown = [d for d in letters if d.error_class == "UnknownBroadcastError"]
            await record_jobs(pg, "sandbox", roots["sandbox"].split("/")[1], NOBODY)
            await produce(kafka, Topic.RESPONSE_EVENTS, [(None, d.payload) for d in unknown])
            await wait_for(
                lambda: loaded_rows(pg, good + len(unknown)), timeout_s=60, what="the replayed event loaded"
            )
            replayed = {k: v for k, v in (await events_by_source(pg)).items() if v["broadcast_id"] == NOBODY}
            for proc in procs:
                assert stop(proc) == 0
        yield Outcome(
            roots,
            servers.sftp_local_root,
            letters,
            rows,
            next(iter(replayed.values()), None),
            (deployment.folder / "gatherer.log").read_text(),
        )


async def loaded_rows(pg: PostgresSettings, n: int) -> bool:
    """Whether responses.events holds ``n`` rows."""
    conn = await connect(pg)
    try:
        return bool(await conn.fetchval("SELECT count(*) FROM responses.events") == n)
    finally:
        await conn.close()


async def events_by_source(pg: PostgresSettings) -> dict[str, dict[str, Any]]:
    """The rows of responses.events by their source (``file:<remote path>:<line>``)."""
    conn = await connect(pg)
    try:
        return {r["source"]: dict(r) for r in await conn.fetch("SELECT * FROM responses.events")}
    finally:
        await conn.close()


@pytest.mark.parametrize("name", sorted(CASES))
def test_good_rows_load_and_bad_rows_are_dead_letters_with_file_line_and_bytes(
    name: str, outcome: Outcome
) -> None:
    case = CASES[name]
    remote = outcome.remote(case)
    loaded = {int(src.rsplit(":", 1)[1]) for src in outcome.rows if src.startswith(f"file:{remote}:")}
    assert loaded == case.good
    letters = {
        d.source.line or 0: d for d in outcome.letters if d.source.kind == "file" and d.source.name == remote
    }
    assert sorted(letters) == sorted(case.bad)
    for line, reason in case.bad.items():
        letter = letters[line]
        assert reason in letter.message
        assert (letter.error_class, letter.service) == ("BadResponseRow", "gatherer")
        assert letter.payload == case.line(line), "the dead letter keeps the row's original bytes"
    assert (outcome.local / outcome.roots[case.account] / "archive" / case.name).exists()
    assert not (outcome.local / outcome.roots[case.account] / "responses" / case.name).exists()


def test_quoted_fields_keep_their_line_breaks(outcome: Outcome) -> None:
    generic = outcome.rows[f"file:{outcome.remote(CASES['quoted.csv'])}:2"]
    assert (generic["esp_message_id"], generic["url"]) == ("two\nlines, one field", "https://x.com/?a=1,2")
    ferg = outcome.rows[f"file:{outcome.remote(CASES['x_FERGE_quoted.txt'])}:2"]
    assert orjson.loads(ferg["extra"]) == {"mailingName": "two\nlines"}


def test_dates_are_stored_in_utc_and_zone_less_ones_read_in_the_configured_zone(outcome: Outcome) -> None:
    generic = outcome.rows[f"file:{outcome.remote(CASES['dates.csv'])}:4"]
    assert generic["occurred_at"] == datetime(2026, 11, 22, 10, tzinfo=UTC)
    local = outcome.remote(CASES["x_FERGE_local.txt"])
    winter, summer = outcome.rows[f"file:{local}:2"], outcome.rows[f"file:{local}:3"]
    assert winter["occurred_at"] == datetime(2026, 11, 22, 10, tzinfo=UTC)  # CET, UTC+1
    assert summer["occurred_at"] == datetime(2026, 7, 1, 10, tzinfo=UTC)  # CEST, UTC+2
    assert winter["email"] == "josé@x.com", "Latin-1 text read in the configured encoding, not mangled"


def test_times_written_several_ways_in_one_file_load_as_the_right_utc_instants(outcome: Outcome) -> None:
    mixed = outcome.remote(CASES["x_FERGE_mixed.txt"])
    loaded = {line: outcome.rows[f"file:{mixed}:{line}"]["occurred_at"] for line in range(2, 7)}
    assert loaded == {
        2: datetime.fromtimestamp(1795330000, UTC),
        3: datetime(2026, 11, 22, 10, tzinfo=UTC),  # 11:00 CET
        4: datetime(2026, 7, 1, 10, tzinfo=UTC),  # 12:00 CEST
        5: datetime(2026, 11, 22, 10, tzinfo=UTC),
        6: datetime(2026, 11, 22, 10, tzinfo=UTC),
    }
    iso = outcome.rows[f"file:{outcome.remote(CASES['x_FERGE_dates.txt'])}:2"]
    assert iso["occurred_at"] == datetime(2026, 11, 22, 10, tzinfo=UTC)


def test_rows_of_a_file_without_a_broadcast_column_take_it_from_the_file_name(outcome: Outcome) -> None:
    named = outcome.remote(CASES[f"{JOB}_FERGE_opens.txt"])
    loaded = [outcome.rows[f"file:{named}:{line}"] for line in (2, 3)]
    assert [(r["broadcast_id"], r["communication_key"], r["type"]) for r in loaded] == [
        (JOB, "fn1", "open"),
        (JOB, "fn2", "click"),
    ]


def test_a_10_mb_line_is_one_bounded_dead_letter(outcome: Outcome) -> None:
    for name in ("huge.csv", "x_FERGE_huge.txt"):
        (letter,) = [d for d in outcome.letters if d.source.name == outcome.remote(CASES[name])]
        assert letter.payload == HUGE[:KEEP_BYTES]
        assert f"the dead letter keeps its first {KEEP_BYTES} bytes" in letter.message
        assert len(letter.to_json()) < 1024 * 1024, "a dead letter fits a Kafka message"


def test_events_of_an_unknown_broadcast_are_dead_letters_that_load_when_replayed(outcome: Outcome) -> None:
    (letter,) = [d for d in outcome.letters if d.error_class == "UnknownBroadcastError"]
    assert letter.service == "loader"
    assert letter.source.kind == "topic"
    assert letter.source.name.endswith(Topic.RESPONSE_EVENTS.value)
    assert f"broadcast '{NOBODY}' is not a job espbridge knows" in letter.message
    event = ResponseEvent.from_json(letter.payload)
    assert (event.broadcast_id, event.source.line) == (NOBODY, 2)
    assert event.source.name == outcome.remote(CASES["unknown.csv"])
    assert outcome.replayed is not None
    assert outcome.replayed["event_id"] == event.event_id


def test_a_file_name_that_is_not_utf8_is_reported_and_left_in_place(outcome: Outcome) -> None:
    (letter,) = [d for d in outcome.letters if d.error_class == "UnreadableFileName"]
    assert letter.payload == UNREADABLE
    assert letter.source.name == f"{outcome.roots['sandbox']}/responses/caf\\xe9.csv"
    assert "rename it on the ESP's site" in letter.message
    responses = os.fsencode(outcome.local / outcome.roots["sandbox"] / "responses")
    assert os.path.exists(os.path.join(responses, UNREADABLE))
    assert '"msg":"response file name is not UTF-8, file left in place"' in outcome.gatherer_log


def test_odd_remote_names_are_never_local_paths(outcome: Outcome) -> None:
    # "back\..\..\escape.csv" was gathered (see its case) and nothing was written outside the folders.
    # (A name starting with "." is an upload in progress by the protocol: left until it is renamed.)
    assert not (outcome.local / outcome.roots["sandbox"] / "escape.csv").exists()
    assert not (outcome.local / "escape.csv").exists()
    assert "Traceback" not in outcome.gatherer_log


def test_the_gatherer_logs_every_file_with_its_bad_rows(outcome: Outcome) -> None:
    logged = {}
    for text in outcome.gatherer_log.splitlines():
        if '"msg":"file gathered"' in text:
            entry = orjson.loads(text)
            logged[entry["file"].rsplit("@", 1)[0]] = entry["bad_rows"]
    assert logged == {outcome.remote(c): len(c.bad) for c in CASES.values()}
