"""The instiller connector against a tiny fake of the documented Instiller endpoints on loopback.

The fake speaks only what docs/connectors/instiller.md says (parameters, bodies, statuses), and
only as much of it as these tests need; the sandbox's instiller flavor is tested elsewhere.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

import orjson
import pytest
from aiohttp import web
from pydantic import SecretStr

from shared.esp import AccountConfig, BadRow, ConnectorContext, ImportState, SendState, SentBroadcast
from shared.esp.base import CancelOutcome
from shared.esp.generic import ListRejectedError
from shared.esp.instiller import InstillerConnector
from shared.esp.registry import CONNECTORS
from shared.esp.rest import EspAuthError, EspRequestError, EspUnavailableError
from shared.model.errors import ConfigurationError, PermanentError
from shared.model.messages import EventType, ResponseEvent, event_id_for
from tests.fixtures.fake_esp import OFFLINE, FakeEsp, pulled, served
from tests.unit.test_messages import job

API_ID = "acc-id"
API_KEY = "k3y-s3cret"
EXPORT_TYPES = ("output", "delivered", "hard", "soft", "open", "clicks_info", "complaints", "unsubscribes")
"""The documented export types, in the documented order."""
DATE_COLUMNS = {
    "output": "SentDate",
    "delivered": "DeliveryDate",
    "hard": "BounceDate",
    "soft": "BounceDate",
    "open": "OpenDate",
    "clicks_info": "ClickDate",
    "complaints": "ComplaintDate",
    "unsubscribes": "UnsubscribeDate",
}


@dataclass
class FakeInstiller(FakeEsp):
    """Imports, sends and export rows as the documentation describes them."""

    base: str = "/rest"
    imports: dict[str, dict[str, Any]] = field(default_factory=dict)  # by external_id
    sends: dict[str, dict[str, Any]] = field(default_factory=dict)  # by external_id
    exports: dict[str, list[Any]] = field(default_factory=dict)  # export type → rows
    rate_limited: int = 0  # answer this many more calls with 429
    retry_after: str = "1"
    broken_envelope: Any = None

    def application(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/rest/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        return await handle(self, request)


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


async def handle(fake: FakeInstiller, request: web.Request) -> web.Response:
    """Checks the body's form and the credentials, then the documented endpoints."""
    if request.method == "POST" and request.content_type != "multipart/form-data":
        return error(415, "unsupported_media_type", "POST parameters are read from multipart/form-data only")
    form = {k: str(v) for k, v in (await request.post()).items()} if request.method == "POST" else {}
    query = dict(request.query)
    p = query if request.method == "GET" else form
    if p.get("api_id") != API_ID or p.get("api_key") != API_KEY:
        return error(401, "invalid_credentials", "API ID or key not recognised")
    if fake.rate_limited:
        fake.rate_limited -= 1
        return error(429, "rate_limited", "slow down", {"Retry-After": fake.retry_after})
    try:
        return route(fake, request.method, request.match_info["tail"], p)
    except KeyError as exc:
        return error(400, "invalid_parameter", f"{exc.args[0]} is required")


def found(records: dict[str, dict[str, Any]], key: str, value: str) -> web.Response:
    """The import or send whose ``key`` (``import_id``, ``send_id``) is ``value``, else the 404."""
    what = key.removesuffix("_id")
    match = [r for r in records.values() if r[key] == value]
    return web.json_response(match[0]) if match else error(404, f"{what}_not_found", f"no such {what}")


def route(fake: FakeInstiller, method: str, tail: str, p: dict[str, str]) -> web.Response:
    if (method, tail) == ("POST", "lists/import_file"):
        ext = p["external_id"]
        if ext in fake.imports:
            return web.json_response({**fake.imports[ext], "created": False})
        if p["file"] == "upload/missing.csv":
            return error(404, "file_not_found", f"{p['file']} not found")
        fake.imports[ext] = {
            "import_id": f"imp-{len(fake.imports) + 1}",
            "external_id": ext,
            "list_api_identifier": p["list_api_identifier"],
            "field_map": p["field_map_api_identifier"],
            "list_name": p["list_name"],
            "file": p["file"],
            "state": "queued",
            "rows_total": 0,
            "rows_imported": 0,
            "rows_rejected": 0,
            "errors": [],
        }
        return web.json_response({**fake.imports[ext], "created": True})
    if (method, tail) == ("GET", "lists/import_status"):
        return found(fake.imports, "import_id", p["import_id"])
    if (method, tail) == ("POST", "emails/send"):
        ext = p["external_id"]
        if ext in fake.sends:
            return web.json_response({**fake.sends[ext], "created": False})
        lists = {i["list_api_identifier"]: i for i in fake.imports.values()}
        imported = lists.get(p["list_api_identifier"])
        if imported is None:
            return error(404, "list_not_found", "no such list")
        if imported["state"] != "complete":
            return error(409, "list_not_ready", "the list's import is not complete")
        fake.sends[ext] = {
            "send_id": f"snd-{len(fake.sends) + 1}",
            "external_id": ext,
            "email_api_identifier": p["email_api_identifier"],
            "list_api_identifier": p["list_api_identifier"],
            "state": "scheduled",
            "recipients": 2,
            "send_at": p.get("send_at"),
            "started_at": None,
            "finished_at": None,
            "error": None,
        }
        return web.json_response({**fake.sends[ext], "created": True})
    if (method, tail) == ("GET", "emails/send_status"):
        return found(fake.sends, "send_id", p["send_id"])
    if (method, tail) == ("GET", "emails/list_sends"):
        ext = p["external_id"]
        return web.json_response({"sends": [fake.sends[ext]] if ext in fake.sends else []})
    if (method, tail) == ("GET", "emails/export_responses"):
        kind, offset, limit = p["export_type"], int(p["offset"]), int(p["limit"])
        if kind not in fake.exports:
            return error(400, "invalid_export_type", f"unknown export_type {kind}")
        if fake.broken_envelope is not None:
            return web.json_response(fake.broken_envelope)
        rows = fake.exports[kind]
        return web.json_response(
            {
                "export_type": kind,
                "list_api_identifier": p["list_api_identifier"],
                "offset": offset,
                "limit": limit,
                "total": len(rows),
                "rows": rows[offset : offset + limit],
            }
        )
    return error(404, "not_found", f"{method} {tail}")


esp = served(FakeInstiller)


def account(url: str = "http://127.0.0.1:1/rest", key: str = API_KEY, **options: Any) -> AccountConfig:
    return AccountConfig(
        esp="instiller",
        account="acme",
        connector="instiller",
        api_url=url,
        client_id=API_ID,
        client_secret=SecretStr(key),
        sftp_root="instiller/acme",
        options=options,
    )


def connector(esp: FakeInstiller, key: str = API_KEY, **options: Any) -> InstillerConnector:
    """A connector on the fake; fast unless the test is about the rate limit."""
    options.setdefault("requests_per_second", 1000)
    return InstillerConnector(account(esp.url, key, **options), ConnectorContext(esp.http))


def row(kind: str, n: int, date: str = "2026-11-22 10:00:00", **values: str) -> dict[str, str]:
    base = {
        "Id": f"snd-1-{kind}-{n}",
        "SendId": "snd-1",
        "EmailApiIdentifier": "november_news",
        "CommunicationKey": f"ck{n}",
        "Email": f"r{n}@example.com",
        DATE_COLUMNS.get(kind, "OpenDate"): date,
    }
    return {**base, **values}


BROADCAST = SentBroadcast(
    job_id="job-1", message="msg-42", import_id="imp-1", send_id="snd-1", requested_at=None
)


async def pull_round(c: InstillerConnector, cursor: str | None) -> tuple[list[ResponseEvent | BadRow], str]:
    """One round of pulls of BROADCAST: the items, and the cursor to store (every page leaves one)."""
    pulls = await pulled(c, BROADCAST, cursor)
    assert None not in pulls.cursors
    return pulls.items, str(pulls.cursors[-1])


# --- configuration ------------------------------------------------------------------------------


def test_registered_under_its_name() -> None:
    assert CONNECTORS["instiller"] is InstillerConnector


async def test_list_format_and_path() -> None:
    c = InstillerConnector(account(), OFFLINE)
    fmt = c.list_format
    assert (fmt.delimiter, fmt.encoding, fmt.line_terminator) == (",", "utf-8", "\n")
    assert (fmt.email_field, fmt.key_field, fmt.drop_folder, fmt.suffix) == (
        "Email",
        "CommunicationKey",
        "upload",
        ".csv",
    )
    assert c.list_path(job()) == "instiller/acme/upload/job-1.csv"
    assert (c.can_send, c.pulls_api, c.response_sources) == (True, True, ())
    other = InstillerConnector(
        account(upload_folder="in", list_suffix=".txt", list_delimiter=";", email_column="EmailAddress"),
        OFFLINE,
    )
    assert other.list_path(job()) == "instiller/acme/in/job-1.txt"
    assert (other.list_format.delimiter, other.list_format.email_field) == (";", "EmailAddress")


async def test_instiller_has_no_cancel_of_a_send() -> None:
    result = await InstillerConnector(account(), OFFLINE).cancel_send("snd-81d2", job())
    assert (result.outcome, result.detail) == (
        CancelOutcome.NOT_SUPPORTED,
        "instiller has no cancel of a send",
    )


async def test_options_given_in_part_are_merged_over_the_defaults() -> None:
    c = InstillerConnector(
        account(
            export_types=["open", "returned"],
            export_type_map={"returned": "bounce_soft"},
            columns={"id": "EventId"},
            paths={"export": "/v2/export"},
        ),
        OFFLINE,
    )
    o = c.options
    assert o.export_type_map["returned"] is EventType.BOUNCE_SOFT
    assert o.export_type_map["open"] is EventType.OPEN
    assert o.id_column == "EventId"
    assert o.paths["export"] == "/v2/export"
    assert o.paths["send"] == "/emails/send"
    assert (o.page_size, o.requests_per_second, o.timezone) == (1000, 5.0, "Europe/London")
    assert o.optional_export_types == ("output", "unsubscribes")


async def test_credentials_are_required() -> None:
    bare = AccountConfig(esp="instiller", account="acme", connector="instiller", api_url="http://x/rest")
    with pytest.raises(ConfigurationError, match="client_id"):
        InstillerConnector(bare, OFFLINE)


# --- requests, imports, sends -----------------------------------------------------------------------


async def test_requests_carry_api_id_and_key_as_parameters_under_the_documented_names(
    esp: FakeInstiller,
) -> None:
    c = connector(esp)
    await c.start_import("instiller/acme/upload/job-1.csv", job())
    post = esp.seen[-1]
    assert (post.method, post.path, post.query) == ("POST", "/lists/import_file", {})
    assert post.content_type == "multipart/form-data"  # as Instiller's public PHP client sends them
    assert post.authorization is None
    assert post.form == {
        "list_api_identifier": "espbridge_job-1",
        "list_name": "November newsletter",
        "field_map_api_identifier": "espbridge",
        "file": "upload/job-1.csv",
        "external_id": "job-1",
        "api_id": API_ID,
        "api_key": API_KEY,
    }
    await c.import_status("imp-1")
    get = esp.seen[-1]
    assert (get.method, get.path, get.form, get.authorization) == ("GET", "/lists/import_status", {}, None)
    assert get.query == {"import_id": "imp-1", "api_id": API_ID, "api_key": API_KEY}

    renamed = connector(esp, params={"external_id": "reference"}, field_map_api_identifier="crm")
    with pytest.raises(EspRequestError, match="invalid_parameter") as info:  # the fake wants the default
        await renamed.start_import("instiller/acme/upload/job-2.csv", job(job_id="job-2"))
    assert isinstance(info.value, PermanentError)
    assert esp.seen[-1].form["reference"] == "job-2"
    assert esp.seen[-1].form["field_map_api_identifier"] == "crm"
    assert API_KEY not in str(info.value)


async def test_imports_are_idempotent_and_their_states_map(esp: FakeInstiller) -> None:
    c = connector(esp)
    first = await c.start_import("instiller/acme/upload/job-1.csv", job())
    again = await c.start_import("instiller/acme/upload/job-1.csv", job())
    assert (first.import_id, first.state) == ("imp-1", ImportState.QUEUED)
    assert again.import_id == first.import_id
    assert len(esp.imports) == 1

    imp = esp.imports["job-1"]
    for esp_state, ours in [
        ("queued", ImportState.QUEUED),
        ("processing", ImportState.RUNNING),
        ("complete", ImportState.DONE),
        ("failed", ImportState.FAILED),
    ]:
        imp["state"] = esp_state
        assert (await c.import_status("imp-1")).state is ours
    imp.update(
        state="complete",
        rows_total=5,
        rows_imported=3,
        rows_rejected=2,
        errors=[{"line": 4, "error": "invalid email"}, {"line": 7, "error": "duplicate key"}],
    )
    status = await c.import_status("imp-1")
    assert (status.rows_valid, status.rows_invalid) == (3, 2)
    assert status.errors == ("line 4: invalid email", "line 7: duplicate key")

    with pytest.raises(ListRejectedError, match="file_not_found"):
        await c.start_import("instiller/acme/upload/missing.csv", job(job_id="job-9"))
    with pytest.raises(ListRejectedError, match="import_not_found"):
        await c.import_status("imp-404")
    with pytest.raises(PermanentError, match="not inside the account folder"):
        await c.start_import("elsewhere/upload/job-1.csv", job())

    imp["state"] = "exploded"
    with pytest.raises(ConfigurationError, match="exploded"):
        await c.import_status("imp-1")


async def test_sends_are_found_once_and_their_states_map(esp: FakeInstiller) -> None:
    c = connector(esp, email_profile_api_identifier="marketing")
    summer = job(send_at="2099-07-01T09:00:00Z")
    assert await c.find_send(summer) is None
    assert esp.seen[-1].query == {"external_id": "job-1", "api_id": API_ID, "api_key": API_KEY}

    await c.start_import("instiller/acme/upload/job-1.csv", summer)
    with pytest.raises(ListRejectedError, match="list_not_ready"):
        await c.send("imp-1", summer)
    esp.imports["job-1"]["state"] = "complete"
    sent = await c.send("imp-1", summer)
    assert (sent.send_id, sent.state) == ("snd-1", SendState.SCHEDULED)
    assert esp.seen[-1].form == {
        "email_api_identifier": "msg-42",
        "list_api_identifier": "espbridge_job-1",
        "external_id": "job-1",
        "send_at": "2099-07-01 10:00:00",  # British Summer Time
        "email_profile_api_identifier": "marketing",
        "api_id": API_ID,
        "api_key": API_KEY,
    }
    again = await c.send("imp-1", summer)
    assert again.send_id == sent.send_id
    assert len(esp.sends) == 1
    found = await c.find_send(summer)
    assert found is not None
    assert found.send_id == "snd-1"

    plain = connector(esp)
    await plain.start_import("instiller/acme/upload/job-2.csv", job(job_id="job-2"))
    esp.imports["job-2"]["state"] = "complete"
    await plain.send("imp-2", job(job_id="job-2"))
    assert set(esp.seen[-1].form) == {
        "email_api_identifier",
        "list_api_identifier",
        "external_id",
        "api_id",
        "api_key",
    }

    record = esp.sends["job-1"]
    for esp_state, ours in [
        ("scheduled", SendState.SCHEDULED),
        ("sending", SendState.SENDING),
        ("sent", SendState.SENT),
    ]:
        record["state"] = esp_state
        assert (await c.send_status("snd-1")).state is ours
    assert esp.seen[-1].query == {"send_id": "snd-1", "api_id": API_ID, "api_key": API_KEY}
    record.update(state="failed", error="sender domain not verified", recipients=9412)
    status = await c.send_status("snd-1")
    assert (status.state, status.recipients, status.detail) == (
        SendState.FAILED,
        9412,
        "sender domain not verified",
    )
    with pytest.raises(ListRejectedError, match="list_not_found"):
        await c.send("imp-x", job(job_id="job-3"))
    with pytest.raises(PermanentError, match="send_not_found"):
        await c.send_status("snd-404")


# --- errors and the rate limit ------------------------------------------------------------------------


async def test_a_refused_key_is_a_configuration_error(esp: FakeInstiller) -> None:
    c = connector(esp, key="wrong-key")
    with pytest.raises(EspAuthError) as info:
        await c.import_status("imp-1")
    assert isinstance(info.value, ConfigurationError)
    assert "wrong-key" not in str(info.value)
    assert "?" not in str(info.value)


async def test_429_carries_retry_after_and_holds_the_next_call(esp: FakeInstiller) -> None:
    c = connector(esp)
    esp.rate_limited = 1
    with pytest.raises(EspUnavailableError) as info:
        await c.find_send(job())
    assert info.value.retry_after_s == 1.0
    assert API_KEY not in str(info.value)
    assert "api_id" not in str(info.value)
    refused_at = esp.seen[-1].at
    assert await c.find_send(job()) is None  # waits for the Retry-After before calling again
    assert esp.seen[-1].at - refused_at >= 0.95

    patience = account(esp.url).model_copy(update={"request_timeout_s": 0.5})  # < the next Retry-After
    impatient = InstillerConnector(patience, ConnectorContext(esp.http))
    esp.rate_limited, esp.retry_after = 1, "30"
    with pytest.raises(EspUnavailableError):
        await impatient.find_send(job())
    calls = len(esp.seen)
    with pytest.raises(EspUnavailableError, match="rate limited") as held:
        await impatient.find_send(job())
    assert len(esp.seen) == calls  # not even tried
    assert held.value.retry_after_s is not None
    assert 25 < held.value.retry_after_s <= 30


async def test_the_limiter_keeps_to_the_documented_five_requests_per_second(esp: FakeInstiller) -> None:
    c = InstillerConnector(account(esp.url), ConnectorContext(esp.http))  # the default options
    await asyncio.gather(*(c.find_send(job()) for _ in range(6)))
    arrivals = sorted(s.at for s in esp.seen)
    assert len(arrivals) == 6
    assert arrivals[-1] - arrivals[0] >= 1.0 - 0.02  # six calls never fit in one second
    assert min(b - a for a, b in pairwise(arrivals)) >= 0.2 - 0.02


# --- responses ------------------------------------------------------------------------------------------


async def test_pulls_page_through_every_export_type_and_resume_from_the_cursor(esp: FakeInstiller) -> None:
    esp.exports = {
        "output": [row("output", n) for n in (1, 2, 3)],
        "delivered": [row("delivered", n) for n in (1, 2)],
        "hard": [],
        "soft": [row("soft", 3, Reason="mailbox full")],
        "open": [row("open", 1, EmailApiIdentifier="")],
        "clicks_info": [row("clicks_info", 1, "2026-11-22 10:14:03", ClickUrl="https://example.com/a,b")],
        "complaints": [],
        # no "unsubscribes": the fake answers invalid_export_type, and it is optional
    }
    c = connector(esp, page_size=2)
    items, cursor = await pull_round(c, None)
    assert [s.query["export_type"] for s in esp.seen] == ["output", *EXPORT_TYPES]  # output has two pages
    assert [s.query["offset"] for s in esp.seen] == ["0", "2"] + ["0"] * 7
    assert {s.query["limit"] for s in esp.seen} == {"2"}
    assert all(s.query["list_api_identifier"] == "espbridge_job-1" for s in esp.seen)
    assert all((s.query["api_id"], s.query["api_key"]) == (API_ID, API_KEY) for s in esp.seen)
    events = [i for i in items if isinstance(i, ResponseEvent)]
    assert len(events) == len(items) == 8
    assert [e.type for e in events] == [
        *[EventType.SENT] * 3,
        *[EventType.DELIVERED] * 2,
        EventType.BOUNCE_SOFT,
        EventType.OPEN,
        EventType.CLICK,
    ]
    third = events[2]
    assert third.event_id == event_id_for("instiller", esp_event_id="acme:output:snd-1-output-3")
    assert (third.source.kind, third.source.name, third.source.page) == (
        "api",
        "/emails/export_responses?export_type=output",
        1,
    )
    assert (third.broadcast_id, third.esp_message_id, third.communication_key, third.email) == (
        "job-1",
        "november_news",
        "ck3",
        "r3@example.com",
    )
    assert third.occurred_at == datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    assert third.extra == {"export_type": "output", "SendId": "snd-1"}
    assert third.url is None
    bounce, opened, click = events[5:]
    assert bounce.extra == {"export_type": "soft", "SendId": "snd-1", "Reason": "mailbox full"}
    assert opened.esp_message_id == "msg-42"  # empty EmailApiIdentifier: the job's message
    assert click.url == "https://example.com/a,b"
    assert click.occurred_at == datetime(2026, 11, 22, 10, 14, 3, tzinfo=UTC)
    assert orjson.loads(cursor) == {
        "v": 1,
        "next": "output",
        "offsets": {
            "output": 3,
            "delivered": 2,
            "hard": 0,
            "soft": 1,
            "open": 1,
            "clicks_info": 1,
            "complaints": 0,
        },
    }

    # new rows are appended; a restarted process resumes from the stored cursor
    esp.exports["output"].append(row("output", 4))
    esp.exports["open"].append(row("open", 2))
    esp.seen.clear()
    restarted = connector(esp, page_size=2)
    more, cursor = await pull_round(restarted, cursor)
    assert [(s.query["export_type"], s.query["offset"]) for s in esp.seen] == [
        ("output", "3"),
        ("delivered", "2"),
        ("hard", "0"),
        ("soft", "1"),
        ("open", "1"),
        ("clicks_info", "1"),
        ("complaints", "0"),
        ("unsubscribes", "0"),
    ]
    assert [(e.communication_key, e.type) for e in more if isinstance(e, ResponseEvent)] == [
        ("ck4", EventType.SENT),
        ("ck2", EventType.OPEN),
    ]
    again, _ = await pull_round(restarted, cursor)  # the unknown optional type is not asked again
    assert again == []
    assert esp.seen[-1].query["export_type"] == "complaints"
    # the same rows read again give the same events
    replay, _ = await pull_round(connector(esp, page_size=2), None)
    assert {e.event_id for e in events} <= {e.event_id for e in replay if isinstance(e, ResponseEvent)}


async def test_bad_rows_become_bad_rows_with_their_line_and_reason(esp: FakeInstiller) -> None:
    missing_date = row("open", 4)
    del missing_date["OpenDate"]
    esp.exports = {
        "open": [
            row("open", 1),
            row("open", 2, CommunicationKey="", Email=""),
            row("open", 3, "not-a-date"),
            missing_date,
            row("open", 5, Id=""),
            {**row("open", 6), "Email": 6},
            "not an object",
            row("open", 8, CommunicationKey=""),  # an email alone is enough
        ],
        "clicks_info": [row("clicks_info", 1), row("clicks_info", 2, ClickUrl="https://e.com")],
    }
    c = connector(esp, export_types=["open", "clicks_info"], page_size=3)
    items, _ = await pull_round(c, None)
    good = [i for i in items if isinstance(i, ResponseEvent)]
    bad = {(i.line, i.error) for i in items if isinstance(i, BadRow)}
    assert [(e.communication_key, e.email) for e in good] == [
        ("ck1", "r1@example.com"),
        (None, "r8@example.com"),
        ("ck2", "r2@example.com"),
    ]
    assert bad == {
        (2, "open row: neither CommunicationKey nor Email"),
        (3, "open row: OpenDate 'not-a-date' does not match '%Y-%m-%d %H:%M:%S'"),
        (4, "open row: no OpenDate"),
        (5, "open row: empty Id"),
        (6, "open row: non-string values in Email"),
        (7, "open row: not an object but str"),
        (1, "clicks_info row: a click without ClickUrl"),
    }
    raws = {i.line: orjson.loads(i.raw) for i in items if isinstance(i, BadRow)}
    assert raws[4] == missing_date
    assert raws[7] == "not an object"


async def test_local_times_are_read_in_the_accounts_zone(esp: FakeInstiller) -> None:
    esp.exports = {
        "open": [
            row("open", 1, "2026-07-01 10:00:00"),  # BST
            row("open", 2, "2026-10-25 01:30:00"),  # repeated hour: the first occurrence (BST)
            row("open", 3, "2026-12-01 10:00:00"),  # GMT
        ]
    }
    c = connector(esp, export_types=["open"])
    items, _ = await pull_round(c, None)
    assert [i.occurred_at for i in items if isinstance(i, ResponseEvent)] == [
        datetime(2026, 7, 1, 9, 0, tzinfo=UTC),
        datetime(2026, 10, 25, 0, 30, tzinfo=UTC),
        datetime(2026, 12, 1, 10, 0, tzinfo=UTC),
    ]
    utc = connector(esp, export_types=["open"], timezone="UTC", date_format="%d/%m/%Y %H:%M")
    esp.exports["open"] = [row("open", 1, "01/07/2026 10:00")]
    (event,) = (await utc.pull_responses(BROADCAST, None)).items
    assert isinstance(event, ResponseEvent)
    assert event.occurred_at == datetime(2026, 7, 1, 10, 0, tzinfo=UTC)


async def test_without_an_id_column_event_ids_come_from_the_facts(esp: FakeInstiller) -> None:
    esp.exports = {
        "clicks_info": [
            row("clicks_info", 1, Id="", ClickUrl="https://e.com"),
            row("clicks_info", 1, Id="", ClickUrl="https://e.com"),
            row("clicks_info", 1, "2026-11-22 10:00:01", Id="", ClickUrl="https://e.com"),
        ]
    }
    c = connector(esp, export_types=["clicks_info"], id_column="")
    items, _ = await pull_round(c, None)
    ids = [i.event_id for i in items if isinstance(i, ResponseEvent)]
    assert len(ids) == 3
    assert ids[0] == ids[1] != ids[2]
    assert ids[0] == event_id_for(
        "instiller",
        broadcast_id="job-1",
        recipient="ck1",
        event_type="click",
        occurred_at=datetime(2026, 11, 22, 10, 0, tzinfo=UTC),
        url="https://e.com",
    )


async def test_a_body_that_is_not_the_envelope_fails_the_call_and_keeps_the_cursor(
    esp: FakeInstiller,
) -> None:
    esp.exports = {"open": [row("open", n) for n in (1, 2, 3)], "clicks_info": []}
    c = connector(esp, export_types=["open", "clicks_info"], page_size=2)
    first = await c.pull_responses(BROADCAST, None)
    assert first.more
    esp.broken_envelope = {"rows": [row("open", 3)]}
    with pytest.raises(EspUnavailableError, match="not the export envelope"):
        await c.pull_responses(BROADCAST, first.cursor)
    esp.broken_envelope = None
    second = await c.pull_responses(BROADCAST, first.cursor)
    assert [s.query["offset"] for s in esp.seen if s.query.get("export_type") == "open"] == ["0", "2", "2"]
    assert [i.communication_key for i in second.items if isinstance(i, ResponseEvent)] == ["ck3"]


async def refused_round(
    c: InstillerConnector, cursor: str | None
) -> tuple[list[ResponseEvent], str, EspRequestError]:
    """Pages until the round fails on a refused export type, as the gatherer makes them: the
    events, the cursor stored last, and the error."""
    events: list[ResponseEvent] = []
    for _ in range(100):
        try:
            page = await c.pull_responses(BROADCAST, cursor)
        except EspRequestError as exc:
            return events, str(cursor), exc
        events += [i for i in page.items if isinstance(i, ResponseEvent)]
        cursor = page.cursor
        assert page.more, "the round ended without reporting the refused type"
    raise AssertionError("the round never ended")


async def test_a_refused_required_export_type_fails_each_round_after_the_other_types_are_read(
    esp: FakeInstiller,
) -> None:
    # The account knows no "open" (Apteco's page names the type "oprn"): no "open" in the fake.
    esp.exports = {t: [row(t, 1)] for t in EXPORT_TYPES if t != "open"}
    esp.exports["clicks_info"] = [row("clicks_info", 1, ClickUrl="https://e.com")]
    c = connector(esp)
    events, cursor, refusal = await refused_round(c, None)
    assert isinstance(refusal, PermanentError), "the operator must act: the gather stage fails"
    error = str(refusal)
    assert [s.query["export_type"] for s in esp.seen] == list(EXPORT_TYPES)
    assert [e.type for e in events] == [
        EventType.SENT,
        EventType.DELIVERED,
        EventType.BOUNCE_HARD,
        EventType.BOUNCE_SOFT,
        EventType.CLICK,
        EventType.COMPLAINT,
        EventType.UNSUBSCRIBE,
    ]
    assert "export types open of account instiller/acme" in error
    assert "invalid_export_type" in error
    assert "options.export_types" in error
    assert orjson.loads(cursor)["next"] == "output", "the next round starts afresh"

    # Each round reads what is new of the other types, asks for "open" again, and fails alike.
    esp.exports["clicks_info"].append(row("clicks_info", 2, ClickUrl="https://e.com/2"))
    esp.seen.clear()
    restarted = connector(esp)
    events, cursor, again = await refused_round(restarted, cursor)
    assert [e.url for e in events] == ["https://e.com/2"]
    assert "open" in [s.query["export_type"] for s in esp.seen]
    assert str(again) == error, "the same words, so the gatherer reports a lasting refusal once"

    # Once the account knows the type, its rows are read from the start and the round ends well.
    esp.exports["open"] = [row("open", 1)]
    items, _ = await pull_round(restarted, cursor)
    assert [(e.type, e.communication_key) for e in items if isinstance(e, ResponseEvent)] == [
        (EventType.OPEN, "ck1")
    ]
