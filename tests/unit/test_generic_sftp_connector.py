"""The generic_sftp connector: FERG-style response files, configurable formats, upload-only, and
contacts files written to the ESP's site."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiohttp
import asyncssh
import pytest

from shared.esp import AccountConfig, BadRow, ConnectorContext, attribution
from shared.esp.accounts import SubscriptionPolicy
from shared.esp.attribution import KeyLists
from shared.esp.base import CancelOutcome, ContactChange
from shared.esp.generic_sftp import GenericSftpConnector, UploadOnlyError
from shared.esp.rest import EspUnavailableError
from shared.infra.db.uploaded_lists import UploadedList
from shared.infra.sftp import SftpPool
from shared.model.errors import ConfigurationError, UnavailableError
from shared.model.messages import EventType, ResponseEvent, SubscriptionState

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
    from shared.operations.lists import ModeError, check_mode
    from tests.unit.test_messages import job

    with pytest.raises(ModeError, match="mode upload_only"):
        check_mode(job(), can_send=False, connector="generic_sftp")
    check_mode(job(mode="upload_only"), can_send=False, connector="generic_sftp")
    check_mode(job(), can_send=True, connector="generic")


def job_for_send() -> Any:
    from tests.unit.test_messages import job

    return job(mode="upload_only")


# --- which broadcast a row belongs to ---------------------------------------------------------------

NO_BROADCAST = "MessageType\turn\temail\ttimestamp"
BY_NAME: dict[str, Any] = {
    "attribution": "file_name",
    "file_name_pattern": r"(?P<broadcast_id>job-\d+)_FERGE_\w+\.txt",
}
MONDAY, TUESDAY = datetime(2026, 11, 23, 9, tzinfo=UTC), datetime(2026, 11, 24, 9, tzinfo=UTC)
LISTS = KeyLists(
    {
        "k1": (UploadedList("job-mon", MONDAY), UploadedList("job-tue", TUESDAY)),
        "k2": (UploadedList("job-tue", TUESDAY),),
    },
    kept_days=90,
)


def parse_named(
    tmp_path: Path, name: str, text: str, lists: KeyLists | None = None, **options: Any
) -> list[ResponseEvent | BadRow]:
    path = tmp_path / "download"
    path.write_text(text, encoding="utf-8")
    c = connector(**options)
    remote = f"ferg/demo/responses/{name}"
    return list(
        c.parse_response_file(path, remote) if lists is None else c.parse_with_lists(path, remote, lists)
    )


def broadcasts(items: list[ResponseEvent | BadRow]) -> list[str]:
    """Each item's broadcast, or its error."""
    return [i.broadcast_id if isinstance(i, ResponseEvent) else f"line {i.line}: {i.error}" for i in items]


def test_rows_of_a_file_without_a_broadcast_column_take_the_broadcast_from_the_file_name(
    tmp_path: Path,
) -> None:
    text = f"{NO_BROADCAST}\nOpen\tk1\ta@x.com\t1795330000\nClick\tk2\tb@x.com\t1795330001\n"
    items = parse_named(tmp_path, "job-7_FERGE_opens.txt", text, **BY_NAME)
    assert broadcasts(items) == ["job-7", "job-7"]
    # The name is the file's own, never its folders: a folder named like a broadcast gives nothing.
    refused = parse_named(tmp_path, "job-8_FERGE_opens.txt/x.txt", text, **BY_NAME)
    assert broadcasts(refused) == [
        "line 1: no row can be attributed to a broadcast: the file name 'x.txt' does not match "
        r"file_name_pattern '(?P<broadcast_id>job-\d+)_FERGE_\w+\.txt'"
    ]


def test_the_rules_are_tried_in_the_accounts_order(tmp_path: Path) -> None:
    text = (
        f"{HEADER}\n"
        "Open\tk1\ta@x.com\tjob-1\tNov\t1795330000\t\t\t\n"
        "Open\tk1\ta@x.com\t\tNov\t1795330000\t\t\t\n"  # the column empty
    )
    column_first = {**BY_NAME, "attribution": ["column", "file_name"]}
    assert broadcasts(parse_named(tmp_path, "job-7_FERGE_opens.txt", text, **column_first)) == [
        "job-1",
        "job-7",
    ]
    name_first = {**BY_NAME, "attribution": ["file_name", "column"]}
    assert broadcasts(parse_named(tmp_path, "job-7_FERGE_opens.txt", text, **name_first)) == [
        "job-7",
        "job-7",
    ]
    # The column alone, as before: an empty one is a bad row, a header without it refuses the file.
    assert broadcasts(parse_named(tmp_path, "x_FERGE_opens.txt", text)) == [
        "job-1",
        "line 3: empty mailingId",
    ]
    no_column = f"{NO_BROADCAST}\nOpen\tk1\ta@x.com\t1795330000\n"
    assert broadcasts(parse_named(tmp_path, "x_FERGE_opens.txt", no_column)) == [
        "line 1: header lacks mailingId"
    ]


@pytest.mark.parametrize(
    ("row", "outcome"),
    [
        ("Open\tk1\t\t2026-11-23T12:00:00Z", "job-mon"),  # after Monday's list, before Tuesday's
        ("Open\tk1\t\t2026-11-24T09:00:00Z", "job-tue"),  # at the upload itself: that list
        ("Open\tk1\t\t2026-12-24T12:00:00Z", "job-tue"),  # the latest of both
        ("Open\tk2\t\t2026-11-24T12:00:00Z", "job-tue"),
        (
            "Open\tk2\t\t2026-11-23T12:00:00Z",
            "communication key 'k2' is in no list uploaded before the event (2026-11-23T12:00:00+00:00); "
            "the first that held it, job-tue, was uploaded at 2026-11-24T09:00:00+00:00",
        ),
        (
            "Open\tk9\t\t2026-11-24T12:00:00Z",
            "communication key 'k9' is in no list uploaded to this account in the last 90 days",
        ),
        ("Open\t\ta@x.com\t2026-11-24T12:00:00Z", "no communication key"),
    ],
)
def test_a_key_takes_the_latest_list_uploaded_before_its_event(
    tmp_path: Path, row: str, outcome: str
) -> None:
    (item,) = parse_named(
        tmp_path, "x_FERGE_opens.txt", f"{NO_BROADCAST}\n{row}\n", LISTS, attribution="communication_key"
    )
    assert broadcasts([item]) == [outcome if outcome.startswith("job-") else f"line 2: {outcome}"]


def test_only_the_keys_no_earlier_rule_attributes_are_looked_up(tmp_path: Path) -> None:
    text = (
        f"{HEADER}\n"
        "Open\tk1\ta@x.com\tjob-1\tNov\t1795330000\t\t\t\n"  # its column says it
        "Open\tk2\tb@x.com\t\tNov\t1795330000\t\t\t\n"
        "Open\tk3\tc@x.com\t\tNov\tyesterday\t\t\t\n"  # a bad time is the parse's to report
        "Open\t\td@x.com\t\tNov\t1795330000\t\t\t\n"  # no key to look up
        "Open\tk2\n"
    )
    path = tmp_path / "x_FERGE_opens.txt"
    path.write_text(text, encoding="utf-8")
    c = connector(attribution=["column", "communication_key"])
    assert c.keys_to_look_up(path, "ferg/demo/responses/x_FERGE_opens.txt") == {"k2", "k3"}
    named = connector(**{**BY_NAME, "attribution": ["file_name", "communication_key"]})
    assert named.keys_to_look_up(path, "ferg/demo/responses/job-7_FERGE_opens.txt") == set()
    # Parsed without the lists (not through the gatherer), a key row says so instead of vanishing.
    items = c.parse_response_file(path, "ferg/demo/responses/x_FERGE_opens.txt")
    assert (
        broadcasts(list(items))[1]
        == "line 3: empty mailingId; communication key 'k2' was not looked up in the uploaded lists"
    )


def test_a_file_no_rule_can_attribute_is_one_bad_row_naming_each_rule(tmp_path: Path) -> None:
    text = "MessageType\temail\ttimestamp\nOpen\ta@x.com\t1795330000\n"
    items = parse_named(
        tmp_path,
        "y.txt",
        text,
        LISTS,
        **{**BY_NAME, "attribution": ["column", "file_name", "communication_key"]},
    )
    assert broadcasts(items) == [
        "line 1: no row can be attributed to a broadcast: the header has no broadcast-id column; the file "
        r"name 'y.txt' does not match file_name_pattern '(?P<broadcast_id>job-\d+)_FERGE_\w+\.txt'; "
        "the header has no communication-key column"
    ]


def test_a_file_of_mixed_time_formats_is_read_by_the_accounts_list(tmp_path: Path) -> None:
    text = (
        f"{NO_BROADCAST}\n"
        "Open\tk1\t\t1795330000\n"
        "Open\tk2\t\t22.11.2026 11:00\n"
        "Open\tk3\t\t2026-11-22T10:00:00Z\n"
        "Open\tk4\t\t2026-11-22T10:00:00\n"
    )
    items = parse_named(
        tmp_path,
        "job-7_FERGE_opens.txt",
        text,
        timestamp_format=["unix", "%d.%m.%Y %H:%M"],
        timezone="Europe/Amsterdam",
        **BY_NAME,
    )
    times = [i.occurred_at if isinstance(i, ResponseEvent) else i.error for i in items]
    assert times == [
        datetime.fromtimestamp(1795330000, UTC),
        datetime(2026, 11, 22, 10, tzinfo=UTC),
        datetime(2026, 11, 22, 10, tzinfo=UTC),
        "timestamp '2026-11-22T10:00:00' is in none of the formats Unix seconds, '%d.%m.%Y %H:%M', "
        "nor ISO 8601 with a zone",
    ]


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"attribution": "file_name"}, "attribution file_name needs a file_name_pattern"),
        ({"file_name_pattern": "(?P<broadcast_id>.+)"}, "attribution does not name file_name"),
        ({**BY_NAME, "file_name_pattern": r"(job-\d+)\.txt"}, "needs a named group (?P<broadcast_id>"),
        ({**BY_NAME, "file_name_pattern": "(?P<broadcast_id>[a-"}, "file_name_pattern"),
        ({"attribution": ["column", "column"]}, "names a rule twice"),
        ({"attribution": ["mailing"]}, "attribution"),
        ({"attribution": []}, "attribution"),
        ({"key_lists_days": 0}, "key_lists_days"),
        ({"timestamp_format": ["unix", "%Q"]}, "'%Q' cannot be read back"),
    ],
)
def test_attribution_options_are_checked_when_the_account_is_read(
    options: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ConfigurationError, match="account ferg/demo options") as info:
        connector(**options)
    assert complaint in str(info.value)


def test_only_accounts_attributing_by_key_have_their_lists_recorded() -> None:
    assert attribution.kept_days(connector()) is None
    assert attribution.kept_days(connector(**BY_NAME)) is None
    assert (
        attribution.kept_days(connector(attribution=["column", "communication_key"], key_lists_days=30)) == 30
    )


async def test_an_esp_reached_by_files_has_no_cancel() -> None:
    from tests.unit.test_messages import job

    result = await connector().cancel_send("job-1", job())
    assert (result.outcome, result.detail) == (
        CancelOutcome.NOT_SUPPORTED,
        "generic_sftp has no cancel of a send",
    )


# --- contacts files ---------------------------------------------------------------------------------


class WrittenFile:
    """A file being written on :class:`MemorySite`."""

    def __init__(self, site: MemorySite, path: str) -> None:
        self.site, self.path = site, path

    async def __aenter__(self) -> WrittenFile:
        self.site.files[self.path] = b""
        return self

    async def __aexit__(self, *_: object) -> None:
        return None

    async def write(self, data: bytes) -> None:
        self.site.files[self.path] += data


class MemorySite:
    """The ESP's SFTP site in memory: the files, and each operation in order."""

    def __init__(self, refuse: Exception | None = None) -> None:
        self.files: dict[str, bytes] = {}
        self.operations: list[str] = []
        self.refuse = refuse

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[MemorySite]:
        if self.refuse is not None:
            raise self.refuse
        yield self

    def open(self, path: str, mode: str) -> WrittenFile:
        assert mode == "wb"
        self.operations.append(f"write {path}")
        return WrittenFile(self, path)

    async def posix_rename(self, source: str, target: str) -> None:
        self.operations.append(f"rename {source} {target}")
        self.files[target] = self.files.pop(source)


def contacts_connector(site: MemorySite, **options: Any) -> GenericSftpConnector:
    return GenericSftpConnector(
        AccountConfig(esp="ferg", account="demo", connector="generic_sftp", options=options),
        ConnectorContext(http=cast(aiohttp.ClientSession, None), sftp=cast(SftpPool, site)),
    )


def contact(email: str, state: SubscriptionState | None, **more: Any) -> ContactChange:
    return ContactChange(email=email, list=more.pop("list_id", "news"), state=state, **more)


async def test_contacts_are_one_file_uploaded_under_a_hidden_name_then_renamed() -> None:
    site = MemorySite()
    changes = [
        contact("ann@example.com", SubscriptionState.SUBSCRIBED, fields={"FirstName": "Ann\tMarie"}),
        contact("bob@example.com", SubscriptionState.UNSUBSCRIBED, reason="crm opt-out", list_id="offers"),
        contact("cy@example.com", SubscriptionState.REMOVED),
        contact("dee@example.com", None, fields={"City": "Oslo"}, reason="ignored without a state"),
    ]
    results = await contacts_connector(site).apply_contacts(changes)
    ((path, data),) = site.files.items()
    assert re.fullmatch(r"ferg/demo/contacts/\d{14}_[0-9a-f]{12}\.txt", path), path
    written, renamed = site.operations
    assert re.fullmatch(
        rf"write ferg/demo/contacts/\.{re.escape(path.rsplit('/', 1)[1])}\.[0-9a-f]+\.partial", written
    )
    assert renamed.endswith(f" {path}")
    assert data.decode() == (
        "Email\tList\tStatus\tReason\tCity\tFirstName\n"
        'ann@example.com\tnews\tsubscribed\t\t\t"Ann\tMarie"\n'
        "bob@example.com\toffers\tunsubscribed\tcrm opt-out\t\t\n"
        "cy@example.com\tnews\tremoved\t\t\t\n"
        "dee@example.com\tnews\t\t\tOslo\t\n"
    )
    assert [(r.accepted, r.state, r.detail) for r in results] == [(True, None, f"in {path}")] * 4


async def test_contacts_the_esp_would_refuse_are_refused_and_not_written() -> None:
    site = MemorySite()
    results = await contacts_connector(site).apply_contacts(
        [
            contact("ann@exa_mple.com", SubscriptionState.SUBSCRIBED),
            contact("bob@example.com", SubscriptionState.SUBSCRIBED, double_opt_in=True),
            contact("cy@example.com", None, fields={"Status": "vip"}),
            contact("dee@example.com", SubscriptionState.SUBSCRIBED),
        ]
    )
    assert [r.accepted for r in results] == [False, False, False, True]
    assert "refuses the address 'ann@exa_mple.com'" in results[0].detail
    assert "no double opt-in" in results[1].detail
    assert "set by espbridge itself" in results[2].detail
    ((_, data),) = site.files.items()
    assert data.decode().splitlines()[1:] == ["dee@example.com\tnews\tsubscribed\t"]


async def test_nothing_to_write_touches_no_site() -> None:
    site = MemorySite(refuse=AssertionError("no session wanted"))
    (result,) = await contacts_connector(site).apply_contacts([contact("a@b", SubscriptionState.SUBSCRIBED)])
    assert not result.accepted


@pytest.mark.parametrize(
    ("refusal", "error"),
    [
        (UnavailableError("connection refused"), EspUnavailableError),
        (asyncssh.SFTPFailure("disk full"), EspUnavailableError),
        (asyncssh.SFTPPermissionDenied("no"), ConfigurationError),
    ],
)
async def test_a_site_out_of_reach_is_an_outage_and_a_refusal_a_configuration_error(
    refusal: Exception, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await contacts_connector(MemorySite(refuse=refusal)).apply_contacts(
            [contact("a@example.com", SubscriptionState.SUBSCRIBED)]
        )


def test_contacts_options_are_checked_when_the_account_is_read() -> None:
    assert contacts_connector(MemorySite()).contacts_per_call == 10_000
    assert contacts_connector(MemorySite(), contacts_per_file=500).contacts_per_call == 500
    with pytest.raises(ConfigurationError, match="contacts_folder"):
        contacts_connector(MemorySite(), contacts_folder="../elsewhere")
    account = AccountConfig(
        esp="ferg",
        account="demo",
        connector="generic_sftp",
        subscriptions=SubscriptionPolicy(lists=("news",), double_opt_in=True),
    )
    with pytest.raises(ConfigurationError, match="double_opt_in"):
        GenericSftpConnector(account, ConnectorContext(http=cast(aiohttp.ClientSession, None)))
