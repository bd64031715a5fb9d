"""The mailup connector against a small fake of MailUp's REST API on loopback (written from
docs/connectors/mailup.md): OAuth2, import chunks, states, sends, statistics paging, the export
parser, the webhook and the client-side rate limiter."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode

import orjson
import pytest
from aiohttp import web
from pydantic import SecretStr

from shared.esp import (
    AccountConfig,
    BadRow,
    ConnectorContext,
    ImportState,
    SendState,
    SentBroadcast,
    WebhookAuthError,
    connector_for,
)
from shared.esp.base import CancelOutcome, ResponseSource
from shared.esp.generic import ListRejectedError
from shared.esp.mailup import MailUpConnector, MessageTakenError, read_list_rows
from shared.esp.rest import EspAuthError, EspUnavailableError
from shared.infra.sftp import SftpPool
from shared.model.errors import ConfigurationError, PermanentError
from shared.model.messages import BroadcastJob, EventType, ResponseEvent, SubscriptionChange, event_id_for
from tests.fixtures.fake_esp import OFFLINE, FakeEsp, Seen, pulled, served
from tests.fixtures.servers import ROOT
from tests.unit.test_messages import job as base_job

CONSOLE = "/API/v1.1/Rest/ConsoleService.svc"
STATS = "/API/v1.1/Rest/MailStatisticsService.svc"
TOKEN_PATH = "/Authorization/OAuth/Token"
PASSWORD_GRANT = {
    "grant_type": "password",
    "client_id": "cid",
    "client_secret": "csecret",
    "username": "user",
    "password": "pw",
}
FIELDS = [
    {"Description": "FirstName", "Id": 1},
    {"Description": "LastName", "Id": 2},
    {"Description": "Company", "Id": 3},
    {"Description": "CommunicationKey", "Id": 38},
    {"Description": "EspbridgeJob", "Id": 39},
]


@dataclass
class FakeMailUp(FakeEsp):
    """Just enough of MailUp for the connector: state the tests set and inspect."""

    expires_in: int = 3600
    grants: list[dict[str, str]] = field(default_factory=list)
    issued: int = 0
    valid: set[str] = field(default_factory=set)
    refresh_tokens: set[str] = field(default_factory=set)
    expire_next: int = 0
    """Answer the next n API calls with the confirmed 401 (token expired)."""
    limit_next: int = 0
    """Answer the next n API calls with the confirmed 429."""
    retry_after: str = "0"
    page_cap: int = 1000
    groups: list[dict[str, Any]] = field(default_factory=list)
    group_posts: list[dict[str, Any]] = field(default_factory=list)
    posted: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)
    next_import: int = 9001
    unavailable_imports: int = 0
    """Answer the next n import POSTs with a 503."""
    imports: dict[int, dict[str, Any]] = field(default_factory=dict)
    queues: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"Undefined": [], "Deferred": [], "Immediate": []}
    )
    history: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    """SendHistory rows by message, in MailUp's shape (no sending id)."""
    counted: dict[int, int] = field(default_factory=dict)
    """The statistics service's ``Count/Recipients`` by message."""
    sends: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    confirmed: list[int] = field(default_factory=list)
    deferred: list[tuple[int, Any]] = field(default_factory=list)
    next_sending: int = 555
    stopped: list[int] = field(default_factory=list)
    delivering: set[int] = field(default_factory=set)
    """Sendings in delivery that a Stop still halts (a Stop of any other sending in no queue: 400)."""
    stats: dict[tuple[int, str], list[dict[str, Any]]] = field(default_factory=dict)

    def application(self) -> web.Application:
        return _app(self)

    def api_calls(self, path_part: str = "") -> list[Seen]:
        """The console and statistics calls (not the token's) whose path holds ``path_part``."""
        return [c for c in self.calls(path_part) if c.path != TOKEN_PATH]


def _envelope(fake: FakeMailUp, request: web.Request, items: list[dict[str, Any]]) -> web.Response:
    query = {k.lower(): v for k, v in request.query.items()}
    size = min(int(query.get("pagesize", "20")), fake.page_cap)
    number = int(query.get("pagenumber", "0"))
    return web.json_response(
        {
            "IsPaginated": True,
            "Items": items[number * size : (number + 1) * size],
            "PageNumber": number,
            "PageSize": size,
            "Skipped": number * size,
            "TotalElementsCount": len(items),
        }
    )


def _error(status: int, description: str, name: str | None) -> web.Response:
    body = {"ErrorCode": str(status), "ErrorDescription": description, "ErrorName": name, "ErrorStack": None}
    return web.json_response(body, status=status)


def _app(fake: FakeMailUp) -> web.Application:
    @web.middleware
    async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == TOKEN_PATH:
            return cast(web.StreamResponse, await handler(request))
        if fake.limit_next:
            fake.limit_next -= 1
            return web.json_response(
                {
                    "ErrorCode": "429",
                    "ErrorDescription": "Authorization error (too_many_requests): Too many requests. "
                    "Max:5 calls per second , actual:6.",
                    "ErrorName": None,
                    "ErrorStack": None,
                },
                status=429,
                headers={"Retry-After": fake.retry_after},
            )
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if fake.expire_next or presented not in fake.valid:
            fake.expire_next = max(0, fake.expire_next - 1)
            return _error(401, "Authorization error: Access token is expired", "Unauthorized")
        return cast(web.StreamResponse, await handler(request))

    async def token(request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        fake.grants.append(form)
        if form.get("grant_type") == "password":
            if {k: form.get(k) for k in PASSWORD_GRANT} != PASSWORD_GRANT:
                return web.json_response({"error": "invalid_grant", "error_description": "no"}, status=400)
        elif form.get("grant_type") == "refresh_token":
            if form.get("refresh_token") not in fake.refresh_tokens or form.get("client_secret") != "csecret":
                return web.json_response({"error": "invalid_grant", "error_description": "spent"}, status=400)
            fake.refresh_tokens.discard(form["refresh_token"])
        else:
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        fake.issued += 1
        access, refresh = f"t{fake.issued}", f"r{fake.issued}"
        fake.valid = {access}
        fake.refresh_tokens.add(refresh)
        return web.json_response(
            {"access_token": access, "expires_in": fake.expires_in, "refresh_token": refresh, "scope": "x"}
        )

    async def dynamic_fields(request: web.Request) -> web.Response:
        return _envelope(fake, request, FIELDS)

    async def groups(request: web.Request) -> web.Response:
        wanted = request.query.get("filterby", "")
        items = [g for g in fake.groups if wanted == f"Name=='{g['Name']}'"]
        return _envelope(fake, request, items)

    async def create_group(request: web.Request) -> web.Response:
        body = await request.json()
        fake.group_posts.append(body)
        group = {**body, "idGroup": 17 + len(fake.groups), "idList": int(request.match_info["list"])}
        fake.groups.append(group)
        return web.json_response(group)

    async def recipients(request: web.Request) -> web.Response:
        if fake.unavailable_imports:
            fake.unavailable_imports -= 1
            response = _error(503, "Service unavailable", None)
            response.headers["Retry-After"] = "0"
            return response
        fake.posted.append((request.path, await request.json()))
        import_id = fake.next_import
        fake.next_import += 1
        fake.imports[import_id] = {"IdImport": import_id, "StatusCode": 1}
        return web.json_response(import_id)

    async def import_detail(request: web.Request) -> web.Response:
        import_id = int(request.match_info["id"])
        if import_id not in fake.imports:
            return _error(404, "Import not found", "NotFound")
        return web.json_response(fake.imports[import_id])

    async def send(request: web.Request) -> web.Response:
        message = int(request.match_info["message"])
        fake.sends.append((request.path, dict(request.query)))
        sending = fake.next_sending
        fake.next_sending += 1
        queue = "Deferred" if "datetime" in request.query else "Undefined"
        fake.queues[queue].append({"Id": sending, "IdList": 1, "IdMessage": message, "State": queue})
        return web.json_response(
            {
                "Id": sending,
                "Sent": 3,
                "InvalidRecipients": [],
                "UnprocessedRecipients": [],
                "idMessage": message,
            }
        )

    async def immediate(request: web.Request) -> web.Response:
        sending = int(request.match_info["id"])
        fake.confirmed.append(sending)
        for item in list(fake.queues["Undefined"]):
            if item["Id"] == sending:
                fake.queues["Undefined"].remove(item)
                fake.queues["Immediate"].append({**item, "State": "Immediate"})
        return web.json_response({"Id": sending, "IdList": 1, "State": "Immediate", "Type": "Newsletter"})

    async def defer(request: web.Request) -> web.Response:
        sending = int(request.match_info["id"])
        fake.deferred.append((sending, await request.json()))
        for item in list(fake.queues["Undefined"]):
            if item["Id"] == sending:
                fake.queues["Undefined"].remove(item)
                fake.queues["Deferred"].append({**item, "State": "Deferred"})
        return web.json_response({"Id": sending, "IdList": 1, "State": "Deferred", "Type": "Newsletter"})

    async def queue(request: web.Request) -> web.Response:
        return _envelope(fake, request, fake.queues[request.match_info["queue"]])

    async def stop(request: web.Request) -> web.Response:
        sending = int(request.match_info["id"])
        queued = [(q, i) for q, items in fake.queues.items() for i in items if i["Id"] == sending]
        if not queued and sending not in fake.delivering:
            return _error(400, f"Sending {sending} is completed and cannot be stopped", "BadRequest")
        for q, item in queued:
            fake.queues[q].remove(item)
        fake.stopped.append(sending)
        return web.json_response(None)

    async def count_recipients(request: web.Request) -> web.Response:
        return web.json_response(fake.counted.get(int(request.match_info["message"]), 0))

    async def send_history(request: web.Request) -> web.Response:
        message = int(request.match_info["message"])
        if message >= 900:
            return _error(404, "Message not found", "NotFound")
        return _envelope(fake, request, fake.history.get(message, []))

    async def statistics(request: web.Request) -> web.Response:
        key = (int(request.match_info["message"]), request.match_info["endpoint"])
        return _envelope(fake, request, fake.stats.get(key, []))

    app = web.Application(middlewares=[auth])
    app.router.add_post(TOKEN_PATH, token)
    app.router.add_get(f"{CONSOLE}/Console/Recipient/DynamicFields", dynamic_fields)
    app.router.add_get(CONSOLE + "/Console/List/{list}/Groups", groups)
    app.router.add_post(CONSOLE + "/Console/List/{list}/Group", create_group)
    app.router.add_post(CONSOLE + "/Console/Group/{group}/Recipients", recipients)
    app.router.add_post(CONSOLE + "/Console/List/{list}/Recipients", recipients)
    app.router.add_get(CONSOLE + "/Console/Imports/{id}", import_detail)
    app.router.add_post(CONSOLE + "/Console/Group/{group}/Email/{message}/Send", send)
    app.router.add_post(CONSOLE + "/Console/List/{list}/Email/{message}/Send", send)
    app.router.add_post(CONSOLE + "/Console/Email/Sendings/{id}/Immediate", immediate)
    app.router.add_post(CONSOLE + "/Console/Email/Sendings/{id}/Deferred", defer)
    app.router.add_get(CONSOLE + "/Console/Email/Sendings/{queue}", queue)
    app.router.add_post(CONSOLE + "/Console/Email/Sendings/{id}/Stop", stop)
    app.router.add_get(CONSOLE + "/Console/List/{list}/Email/{message}/SendHistory", send_history)
    app.router.add_get(STATS + "/Message/{message}/List/{endpoint}", statistics)
    app.router.add_get(STATS + "/Message/{message}/Count/Recipients", count_recipients)
    return app


fake = served(FakeMailUp, name="fake")


def account(url: str, *, secret: str | None = "s3cr3t", **options: Any) -> AccountConfig:
    return AccountConfig(
        esp="mailup",
        account="demo",
        connector="mailup",
        api_url=url,
        username="user",
        password=SecretStr("pw"),
        client_id="cid",
        client_secret=SecretStr("csecret"),
        token=SecretStr(secret) if secret is not None else None,
        request_timeout_s=5,
        options={"list_id": 1, "rate_limit_per_s": 1000, **options},
    )


def make(fake: FakeMailUp, sftp: SftpPool | None = None, **options: Any) -> MailUpConnector:
    made = connector_for(account(fake.url, **options), ConnectorContext(fake.http, sftp))
    assert isinstance(made, MailUpConnector)
    return made


def offline(**options: Any) -> MailUpConnector:
    return MailUpConnector(account("http://127.0.0.1:1", **options), OFFLINE)


def job(**overrides: Any) -> BroadcastJob:
    values: dict[str, Any] = {
        "message": "42",
        "field_map": {"email": "Email", "first_name": "FirstName"},
        **overrides,
    }
    return base_job(**values)


async def chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


# --- configuration -----------------------------------------------------------------------------------


def test_options_are_checked_and_name_the_account() -> None:
    assert offline().options.page_size == 500
    with pytest.raises(ConfigurationError, match="mailup/demo options"):
        offline(statistics_source="ftp")
    with pytest.raises(ConfigurationError, match="mailup/demo options"):
        offline(no_such_option=1)
    with pytest.raises(ConfigurationError, match="export_columns has unknown roles"):
        offline(export_columns={"colour": "x"})
    with pytest.raises(ConfigurationError, match="webhook_params has unknown roles"):
        offline(webhook_params={"colour": "x"})
    with pytest.raises(ConfigurationError, match="distinct"):
        offline(webhook_params={"job": "Key"})
    with pytest.raises(ConfigurationError, match="mailup/demo options"):
        MailUpConnector(
            account("http://127.0.0.1:1").model_copy(update={"options": {}}),
            OFFLINE,
        )
    no_user = account("http://127.0.0.1:1").model_copy(update={"username": None})
    with pytest.raises(ConfigurationError, match="needs username"):
        MailUpConnector(no_user, OFFLINE)


def test_the_job_and_key_travel_in_numbered_fields() -> None:
    assert (offline().options.key_field, offline().options.job_field) == (38, 39)
    assert offline(key_field="7").options.key_field == 7
    with pytest.raises(ConfigurationError, match=r"field number \(1 to 39, as in \[Field07\]\), not a name"):
        offline(job_field="EspbridgeJob")
    for bad in (0, 40):
        with pytest.raises(ConfigurationError, match="key_field"):
            offline(key_field=bad)
    with pytest.raises(ConfigurationError, match="both field 7"):
        offline(key_field=7, job_field=7)
    assert offline().options.webhook_parameters() == [
        ("Secret", "<secret>"),
        ("EventType", "[EventType]"),
        ("EventSource", "[EventSource]"),
        ("EventDate", "[EventDate]"),
        ("IdList", "[IdList]"),
        ("IdNL", "[IdNL]"),
        ("Email", "[Email]"),
        ("Reason", "[Reason]"),
        ("Job", "[Field39]"),
        ("Key", "[Field38]"),
    ]
    renamed = offline(job_field=7, webhook_params={"job": "j", "secret": "s"}).options.webhook_parameters()
    assert (renamed[0], renamed[-2]) == (("s", "<secret>"), ("j", "[Field07]"))


# --- OAuth2 ------------------------------------------------------------------------------------------


async def test_the_password_grant_sends_the_documented_form(fake: FakeMailUp) -> None:
    assert await make(fake).find_send(job()) is None
    assert fake.grants == [PASSWORD_GRANT]
    paths = [c.path.removeprefix(CONSOLE) for c in fake.api_calls()]
    assert paths == [
        "/Console/Email/Sendings/Undefined",
        "/Console/Email/Sendings/Deferred",
        "/Console/Email/Sendings/Immediate",
        "/Console/List/1/Email/42/SendHistory",
        f"{STATS}/Message/42/Count/Recipients",
    ]
    assert {(c.authorization, c.accept) for c in fake.api_calls()} == {("Bearer t1", "application/json")}
    paged = fake.api_calls()[:4]  # the count is a bare number, not a paged list
    assert {(c.query["pageSize"], c.query["pageNumber"]) for c in paged} == {("500", "0")}


async def test_the_token_is_refreshed_before_it_expires(fake: FakeMailUp) -> None:
    fake.expires_in = 30  # within token_margin_s (60): every call finds it about to expire
    await make(fake).find_send(job())
    assert [g["grant_type"] for g in fake.grants] == ["password"] + ["refresh_token"] * 4
    assert fake.grants[1] == {
        "grant_type": "refresh_token",
        "client_id": "cid",
        "client_secret": "csecret",
        "refresh_token": "r1",
    }
    assert [g["refresh_token"] for g in fake.grants[1:]] == ["r1", "r2", "r3", "r4"]  # each used once
    assert [c.authorization for c in fake.api_calls()] == [f"Bearer t{n}" for n in range(1, 6)]


async def test_a_401_refreshes_once_and_repeats_the_call(fake: FakeMailUp) -> None:
    mailup = make(fake)
    await mailup.send_status("42:555")
    fake.expire_next = 1
    before = len(fake.api_calls())
    status = await mailup.send_status("42:555")
    assert status.state is SendState.FAILED
    assert len(fake.api_calls()) - before == 6  # five reads, one of them twice
    assert [g["grant_type"] for g in fake.grants] == ["password", "refresh_token"]
    fake.refresh_tokens.clear()  # a refused refresh falls back to the password grant
    fake.expire_next = 1
    await mailup.send_status("42:555")
    assert [g["grant_type"] for g in fake.grants][2:] == ["refresh_token", "password"]
    fake.expire_next = 2
    before = len(fake.api_calls())
    with pytest.raises(EspAuthError):
        await mailup.send_status("42:555")
    assert len(fake.api_calls()) - before == 2  # one repeat, never a loop


async def test_a_refused_password_is_a_configuration_error(fake: FakeMailUp) -> None:
    wrong = account(fake.url).model_copy(update={"password": SecretStr("nope")})
    with pytest.raises(ConfigurationError, match="refused the credentials"):
        await MailUpConnector(wrong, ConnectorContext(fake.http)).send_status("42:1")
    assert fake.api_calls() == []


# --- rate limits -------------------------------------------------------------------------------------


async def test_the_limiter_keeps_five_calls_per_second(fake: FakeMailUp) -> None:
    mailup = make(fake, rate_limit_per_s=5)
    await asyncio.gather(*(mailup.send_status(f"42:{n}") for n in range(3)))  # 15 calls
    times = sorted(c.at for c in fake.api_calls())
    assert len(times) == 15
    assert fake.most_within(1.0, "/API/v1.1/Rest/") <= 5  # as MailUp counts them, on arrival
    assert times[-1] - times[0] >= 2.0  # 15 calls at 5/s need two full waits
    assert len(fake.grants) == 1  # token calls are not limited (nor counted)


async def test_a_429_is_waited_out_and_repeated(fake: FakeMailUp) -> None:
    mailup = make(fake)
    fake.limit_next = 2
    assert (await mailup.send_status("42:1")).state is SendState.FAILED
    assert len(fake.api_calls()) == 7
    fake.limit_next, fake.retry_after = 1, "30"  # longer than the request timeout: the caller waits
    with pytest.raises(EspUnavailableError) as info:
        await mailup.send_status("42:1")
    assert info.value.retry_after_s == 30.0


# --- import --------------------------------------------------------------------------------------------

LONG = "x" * 201
LIST_FILE = (
    "Email,FirstName,CommunicationKey\n"  # 1
    "anna@example.com,Anna,K-1\n"  # 2
    '"bob@example.com","Bob ""B"", Jr",K-2\n'  # 3
    "ANNA@example.com,Dup,K-3\n"  # 4: email again (case-insensitive)
    "carl@example.com,,K-2\n"  # 5: key again
    "dora@example.com,Dora\n"  # 6: two fields
    "eve@example.com,Eve,\n"  # 7: no key
    'fay@example.com,"multi\nline",K-6\n'  # 8-9
    f"gus@example.com,{LONG},K-7\n"  # 10: over 200 characters
    "hal@example.com,Hål,K-8\n"  # 11
    ",NoEmail,K-9\n"  # 12: left to MailUp
).encode()


def _fields(key: str, first: str) -> list[dict[str, Any]]:
    return [{"Id": 38, "Value": key}, {"Id": 39, "Value": "42:job-1"}, {"Id": 1, "Value": first}]


async def test_list_rows_are_read_across_chunk_boundaries() -> None:
    data = 'a,b\r\n"x\r\ny",é\r\n\r\nlast,"q""q"'.encode()
    rows = [r async for r in read_list_rows(chunked(data, 1))]
    assert rows == [(1, ["a", "b"]), (2, ["x\r\ny", "é"]), (4, []), (5, ["last", 'q"q'])]
    with pytest.raises(PermanentError, match=r"^the list file is not UTF-8 \(after line 1\): "):
        [r async for r in read_list_rows(chunked(b"Email,Key\nj\xf6rg@x.com,K1\n", 1))]


async def test_the_list_is_posted_in_chunks_to_the_jobs_group(fake: FakeMailUp) -> None:
    mailup = make(fake, import_chunk_rows=2)
    fake.unavailable_imports = 1  # repeated in place: a re-post is an upsert
    status = await mailup.import_list(chunked(LIST_FILE, 5), job())
    assert status.import_id == "17/5/9001,9002,9003"
    assert status.state is ImportState.QUEUED
    assert status.rows_invalid == 5
    assert [e.split(":")[0] for e in status.errors] == ["line 4", "line 5", "line 6", "line 7", "line 10"]
    assert fake.group_posts == [
        {"Name": "espbridge-job-1", "Notes": "November newsletter", "Deletable": True}
    ]
    assert fake.api_calls("/Groups")[0].query["filterby"] == "Name=='espbridge-job-1'"
    assert [p for p, _ in fake.posted] == [f"{CONSOLE}/Console/Group/17/Recipients"] * 3
    assert len(fake.api_calls("/Recipients")) == 4
    assert [body for _, body in fake.posted] == [
        [
            {"Email": "anna@example.com", "Name": "", "Fields": _fields("K-1", "Anna")},
            {"Email": "bob@example.com", "Name": "", "Fields": _fields("K-2", 'Bob "B", Jr')},
        ],
        [
            {"Email": "fay@example.com", "Name": "", "Fields": _fields("K-6", "multi\nline")},
            {"Email": "hal@example.com", "Name": "", "Fields": _fields("K-8", "Hål")},
        ],
        [{"Email": "", "Name": "", "Fields": _fields("K-9", "NoEmail")}],
    ]
    again = await mailup.import_list(chunked(LIST_FILE, 4096), job())  # the group is found, not made again
    assert again.import_id == "17/5/9004,9005,9006"
    assert len(fake.group_posts) == 1


async def test_send_to_list_posts_to_the_list_and_an_unknown_column_fails(fake: FakeMailUp) -> None:
    mailup = make(fake, send_to="list")
    status = await mailup.import_list(chunked(b"Email,CommunicationKey\na@x.com,K-1\n", 100), job())
    assert status.import_id == "0/0/9001"
    assert fake.posted[0][0] == f"{CONSOLE}/Console/List/1/Recipients"
    assert fake.group_posts == []
    with pytest.raises(ListRejectedError, match="'Shoe'"):
        await mailup.import_list(chunked(b"Email,Shoe,CommunicationKey\na@x.com,9,K-1\n", 100), job())
    with pytest.raises(
        ListRejectedError, match=r"no personal data field 37 \(job_field\); .* 1, 2, 3, 38, 39"
    ):
        await make(fake, job_field=37).import_list(chunked(b"Email,CommunicationKey\n", 9), job())
    with pytest.raises(ListRejectedError, match="go to one MailUp field"):
        await make(fake, key_field=1).import_list(chunked(b"Email,FirstName,CommunicationKey\n", 9), job())


class FakeRemoteFile:
    def __init__(self, data: bytes) -> None:
        self._data = data

    async def read(self, size: int) -> bytes:
        chunk, self._data = self._data[:size], self._data[size:]
        return chunk


class FakeSftp:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    @contextlib.asynccontextmanager
    async def open(self, path: str, mode: str) -> AsyncIterator[FakeRemoteFile]:
        assert mode == "rb"
        yield FakeRemoteFile(self.files[path])

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[FakeSftp]:
        yield self


async def test_start_import_reads_the_file_back_and_refuses_a_used_message(fake: FakeMailUp) -> None:
    remote = "mailup/demo/drop/job-1.csv"
    sftp = cast(SftpPool, FakeSftp({remote: LIST_FILE}))
    mailup = make(fake, sftp)
    assert mailup.list_path(job()) == remote
    status = await mailup.start_import(remote, job())
    assert status.import_id == "17/5/9001"
    assert len(fake.posted[0][1]) == 5
    fake.history[42] = [_history_row(5, ended=False)]
    with pytest.raises(MessageTakenError, match="already has a sending \\(42\\)"):
        await mailup.start_import(remote, job())
    with pytest.raises(ListRejectedError, match="not a MailUp message id"):
        await mailup.start_import(remote, job(message="msg-42"))
    with pytest.raises(ListRejectedError, match="no message 901"):
        await mailup.start_import(remote, job(message="901"))


def _detail(code: int, valid: int = 0, repeated: int = 0, invalid: int = 0, bad: int = 0) -> dict[str, Any]:
    return {
        "IdImport": 0,
        "StatusCode": code,
        "Rows": {
            "Total": valid + invalid,
            "Valid": {"Total": valid, "EmailNew": valid, "RepeatedEmail": repeated},
            "Invalid": {"Total": invalid, "InvalidEmail": bad, "WithoutEmail": invalid - bad},
        },
    }


async def test_import_status_folds_every_chunk(fake: FakeMailUp) -> None:
    mailup = make(fake)
    fake.imports = {9001: _detail(1), 9002: _detail(1)}
    assert (await mailup.import_status("17/2/9001,9002")).state is ImportState.QUEUED
    fake.imports = {9001: _detail(3, valid=4998, repeated=1, invalid=2, bad=1), 9002: _detail(2)}
    status = await mailup.import_status("17/2/9001,9002")
    assert status.state is ImportState.RUNNING
    assert (status.rows_valid, status.rows_invalid) == (4997, 2 + 2 + 1)
    assert "import 9001: 1 invalid email, 1 without email, 1 repeated email" in status.errors
    assert any("2 rows" in e for e in status.errors)  # the local reasons are not known to this instance
    fake.imports[9002] = _detail(7, valid=10)  # an unknown code reads as running
    assert (await mailup.import_status("17/2/9001,9002")).state is ImportState.RUNNING
    fake.imports[9002] = _detail(3, valid=10)
    status = await mailup.import_status("17/2/9001,9002")
    assert (status.state, status.rows_valid) == (ImportState.DONE, 5007)
    assert len(fake.api_calls("/Imports/9001")) == 2  # a final answer is kept
    fake.imports[9003] = _detail(4)
    failed = await mailup.import_status("17/0/9001,9003")
    assert failed.state is ImportState.FAILED
    assert "import 9003 failed (StatusCode 4)" in failed.errors
    assert (await mailup.import_status("17/0/9999")).state is ImportState.FAILED  # unknown import
    assert (await mailup.import_status("17/3/")).state is ImportState.FAILED  # nothing was posted
    with pytest.raises(ListRejectedError):
        await mailup.import_status("nonsense")


async def test_import_status_reports_the_local_reasons(fake: FakeMailUp) -> None:
    mailup = make(fake)
    started = await mailup.import_list(chunked(LIST_FILE, 64), job())
    fake.imports[9001] = _detail(3, valid=5)
    status = await mailup.import_status(started.import_id)
    assert (status.state, status.rows_valid, status.rows_invalid) == (ImportState.DONE, 5, 5)
    assert status.errors[0] == "line 4: email 'ANNA@example.com' already in the file"


# --- send ----------------------------------------------------------------------------------------------


def _history_row(recipients: int, ended: bool = True) -> dict[str, Any]:
    """A SendHistory item as MailUp's help page shows one: no sending id, no list id, ``idMessage``."""
    return {
        "EndDate": "2026-11-22 10:00:31Z" if ended else None,
        "Kb_transferred": 42 * recipients,
        "Recipients": recipients,
        "SenderEmail": "news@example.com",
        "SenderName": "News",
        "StartDate": "2026-11-22 10:00:06Z",
        "idMessage": 42,
    }


async def test_send_posts_and_confirms_and_the_history_says_when_it_is_sent(fake: FakeMailUp) -> None:
    mailup = make(fake)
    status = await mailup.send("17/0/9001", job())
    assert (status.send_id, status.state, status.recipients) == ("42:555", SendState.SCHEDULED, 3)
    assert fake.sends == [(f"{CONSOLE}/Console/Group/17/Email/42/Send", {})]
    assert fake.confirmed == [555]
    assert (await mailup.send_status("42:555")).state is SendState.SENDING  # in the Immediate queue
    fake.queues["Immediate"] = []
    fake.history[42] = [_history_row(3, ended=False)]
    delivering = await mailup.send_status("42:555")
    assert (delivering.send_id, delivering.state, delivering.detail) == (
        "42:555",
        SendState.SENDING,
        "sending 555 in delivery",
    )
    fake.history[42] = [_history_row(3)]
    sent = await mailup.send_status("42:555")
    assert (sent.send_id, sent.state, sent.recipients) == ("42:555", SendState.SENT, 3)
    with pytest.raises(MessageTakenError, match="message 42 already sent"):
        await mailup.send("17/0/9001", job())


async def test_a_sending_found_nowhere_has_failed(fake: FakeMailUp) -> None:
    mailup = make(fake)
    missing = await mailup.send_status("42:556")
    assert (missing.state, missing.detail) == (
        SendState.FAILED,
        "sending 556 not found (in no queue, no SendHistory, no recipients)",
    )
    unknown = await mailup.send_status("901")  # MailUp does not know the message
    assert unknown.state is SendState.FAILED
    with pytest.raises(ListRejectedError, match="not a mailup send id"):
        await mailup.send_status("42:x")


async def test_a_deferred_send_quotes_its_time_and_is_not_confirmed(fake: FakeMailUp) -> None:
    mailup = make(fake)
    when = datetime(2099, 11, 22, 11, 0, tzinfo=UTC)
    status = await mailup.send("17/0/9001", job(send_at=when.isoformat()))
    assert status.state is SendState.SCHEDULED
    assert fake.sends == [
        (f"{CONSOLE}/Console/Group/17/Email/42/Send", {"datetime": '"2099-11-22 11:00:00Z"'})
    ]
    assert fake.confirmed == []
    assert (await mailup.send_status(status.send_id)).state is SendState.SCHEDULED
    # a send_at already passed (the monitor calls the send at its time) goes out now, confirmed
    due = datetime(2026, 11, 22, 11, 0, tzinfo=UTC).isoformat()
    await mailup.send("18/0/9001", job(message="45", send_at=due))
    assert fake.sends[-1] == (f"{CONSOLE}/Console/Group/18/Email/45/Send", {})
    assert len(fake.confirmed) == 1
    unconfirmed = make(fake, confirm_sending=False, send_to="list")
    await unconfirmed.send("0/0/9001", job(message="43"))
    assert fake.sends[-1] == (f"{CONSOLE}/Console/List/1/Email/43/Send", {})
    assert len(fake.confirmed) == 1


async def test_find_send_reads_every_queue_page(fake: FakeMailUp) -> None:
    mailup = make(fake, page_size=2)
    fake.queues["Deferred"] = [{"Id": n, "IdMessage": 100 + n} for n in range(5)]
    assert await mailup.find_send(job()) is None
    fake.queues["Deferred"].append({"Id": 600, "IdMessage": 42})
    found = await mailup.find_send(job())
    assert found is not None
    assert (found.send_id, found.state) == ("42:600", SendState.SCHEDULED)
    fake.queues["Deferred"].pop()
    fake.queues["Immediate"] = [{"Id": 601, "IdMessage": 42}]
    found = await mailup.find_send(job())
    assert found is not None
    assert (found.send_id, found.state) == ("42:601", SendState.SENDING)


async def test_after_a_restart_the_history_proves_the_message_was_sent(fake: FakeMailUp) -> None:
    """The queues no longer hold the sending and SendHistory rows name no sending: the message,
    which is the job's own, is what ties them to the job (send id ``<message>``)."""
    mailup = make(fake)
    fake.history[42] = [_history_row(9, ended=False)]
    found = await mailup.find_send(job())
    assert found is not None
    assert (found.send_id, found.state, found.recipients) == ("42", SendState.SENDING, 9)
    fake.history[42] = [_history_row(9)]
    sent = await mailup.send_status("42")
    assert (sent.send_id, sent.state, sent.recipients, sent.detail) == (
        "42",
        SendState.SENT,
        9,
        "the sending of message 42 finished",
    )


async def test_recipients_counted_without_history_are_a_sending_in_delivery(fake: FakeMailUp) -> None:
    mailup = make(fake)
    fake.counted[42] = 7  # delivery began; SendHistory has no row yet
    found = await mailup.find_send(job())
    assert found is not None
    assert (found.send_id, found.state, found.recipients) == ("42", SendState.SENDING, 7)
    assert (await mailup.send_status("42:555")).state is SendState.SENDING
    with pytest.raises(MessageTakenError):
        await mailup.send("17/0/9001", job())


async def test_a_sending_left_unconfirmed_is_confirmed_when_it_is_found(fake: FakeMailUp) -> None:
    mailup = make(fake)
    fake.queues["Undefined"] = [{"Id": 603, "IdMessage": 42}]
    found = await mailup.find_send(job())
    assert found is not None
    assert (found.send_id, found.state, found.detail) == (
        "42:603",
        SendState.SCHEDULED,
        "sending 603 confirmed",
    )
    assert fake.confirmed == [603]
    # a deferred job's sending is scheduled for its send_at instead
    fake.queues["Undefined"] = [{"Id": 604, "IdMessage": 43}]
    when = datetime(2099, 11, 22, 11, 0, tzinfo=UTC)
    deferred = await mailup.find_send(job(message="43", send_at=when.isoformat()))
    assert deferred is not None
    assert deferred.send_id == "43:604"
    assert fake.deferred == [(604, {"Date": "2099-11-22 11:00:00Z"})]
    assert fake.confirmed == [603]
    # without confirm_sending, a person confirms it in the console
    fake.queues["Undefined"] = [{"Id": 605, "IdMessage": 44}]
    waiting = await make(fake, confirm_sending=False).find_send(job(message="44"))
    assert waiting is not None
    assert (waiting.state, waiting.detail) == (SendState.SCHEDULED, "sending 605 in the Undefined queue")
    assert fake.confirmed == [603]


# --- cancel --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("queue", ["Undefined", "Deferred", "Immediate"])
async def test_a_queued_sending_is_stopped_and_nothing_is_sent(fake: FakeMailUp, queue: str) -> None:
    fake.queues[queue] = [{"Id": 555, "IdMessage": 42, "State": queue}]
    result = await make(fake).cancel_send("42:555", job())
    assert (result.outcome, result.detail) == (
        CancelOutcome.CANCELLED,
        f"sending 555 stopped in the {queue} queue: nothing was sent",
    )
    assert (fake.stopped, fake.queues[queue]) == ([555], [])
    (stop,) = fake.api_calls("/Stop")
    assert (stop.method, stop.path) == ("POST", f"{CONSOLE}/Console/Email/Sendings/555/Stop")


async def test_a_sending_in_delivery_is_stopped_and_its_rest_not_sent(fake: FakeMailUp) -> None:
    fake.history[42] = [_history_row(3, ended=False)]
    fake.delivering = {555}
    result = await make(fake).cancel_send("42:555", job())
    assert (result.outcome, result.detail) == (
        CancelOutcome.CANCELLED,
        "sending 555 stopped in delivery: recipients reached before it got the message",
    )
    assert fake.stopped == [555]


@pytest.mark.parametrize(
    ("send_id", "ended", "detail"),
    [
        ("42:555", True, "sending 555 finished (3 recipients)"),
        (
            "42",
            False,
            "found only in its SendHistory: delivery began, and MailUp's Stop needs the sending's id",
        ),
        (
            "42:555",
            False,
            "sending 555: MailUp refused the stop: Sending 555 is completed and cannot be stopped",
        ),
    ],
    ids=["finished", "no sending id", "stop refused"],
)
async def test_a_sending_that_went_out_is_too_late(
    fake: FakeMailUp, send_id: str, ended: bool, detail: str
) -> None:
    fake.history[42] = [_history_row(3, ended=ended)]
    result = await make(fake).cancel_send(send_id, job())
    assert result.outcome is CancelOutcome.TOO_LATE
    assert detail in result.detail
    assert fake.stopped == []


async def test_a_sending_stopped_before_is_cancelled_without_another_stop(fake: FakeMailUp) -> None:
    # the answer to an earlier Stop was lost: the sending has left its queue and has no history
    result = await make(fake).cancel_send("42:555", job())
    assert (result.outcome, result.detail) == (
        CancelOutcome.CANCELLED,
        "sending 555 is in no queue and has no history: stopped",
    )
    assert fake.api_calls("/Stop") == []


async def test_stops_keep_to_one_every_30_seconds(fake: FakeMailUp) -> None:
    fake.queues["Deferred"] = [{"Id": 555, "IdMessage": 42}, {"Id": 556, "IdMessage": 43}]
    mailup = make(fake)
    await mailup.cancel_send("42:555", job())
    with pytest.raises(EspUnavailableError, match="one Stop every 30s") as waited:
        await mailup.cancel_send("43:556", job(message="43"))
    wait = waited.value.retry_after_s
    assert wait is not None
    assert 0 < wait <= 30, "the rest of the window, for the caller to wait"
    assert fake.stopped == [555], "the second Stop was not sent"
    await make(fake, stop_interval_s=0).cancel_send("43:556", job(message="43"))
    assert fake.stopped == [555, 556]


async def test_a_cancel_of_an_unknown_message_or_a_bad_send_id_is_refused(fake: FakeMailUp) -> None:
    with pytest.raises(ListRejectedError, match="MailUp knows no message 901"):
        await make(fake).cancel_send("901:555", job(message="901"))
    with pytest.raises(ListRejectedError, match="not a mailup send id"):
        await make(fake).cancel_send("42:x", job())


# --- statistics API ------------------------------------------------------------------------------------

BROADCAST = SentBroadcast(
    job_id="job-1", message="42", import_id="17/0/9001", send_id="42:555", requested_at=None
)


def _stats(fake: FakeMailUp) -> None:
    person = [{"Email": f"p{n}@example.com", "IdMessage": 42, "IdRecipient": 1000 + n} for n in range(3)]
    fake.stats = {
        (42, "Recipients"): person,
        (42, "Bounces"): [
            {**person[0], "Code": "5.1.1"},
            {**person[1], "Code": "452"},
            {**person[2], "Code": "999"},
        ],
        (42, "Views"): [{**person[0], "Count": 2}],
        (42, "UrlClickDetails"): [{**person[0], "Count": 2, "Url": "https://x.com/a;b,c"}],
        (42, "Unsubscriptions"): [
            {**person[0], "Email": "P0@Example.com", "Reason": 1},
            {**person[1], "Reason": 2},
            {**person[2], "Reason": 3},
        ],
    }


async def test_statistics_are_pulled_page_by_page(fake: FakeMailUp) -> None:
    _stats(fake)
    mailup = make(fake, page_size=2)
    pulls = await pulled(mailup, BROADCAST, None)
    items, cursors = pulls.items, pulls.cursors
    assert [orjson.loads(c or "") for c in cursors] == [
        {"v": 1, "ep": "Recipients", "page": 1},
        {"v": 1, "ep": "Bounces", "page": 0},
        {"v": 1, "ep": "Bounces", "page": 1},
        {"v": 1, "ep": "Views", "page": 0},
        {"v": 1, "ep": "UrlClickDetails", "page": 0},
        {"v": 1, "ep": "Unsubscriptions", "page": 0},
        {"v": 1, "ep": "Unsubscriptions", "page": 1},
        {"v": 1, "ep": "Recipients", "page": 0},  # more=false: the next call starts a new round
    ]
    events = [i for i in items if isinstance(i, ResponseEvent)]
    bad = [i for i in items if isinstance(i, BadRow)]
    counts = {t: sum(1 for e in events if e.type is t) for t in EventType}
    assert {t.value: n for t, n in counts.items() if n} == {
        "sent": 3,
        "bounce_hard": 1,
        "bounce_soft": 1,
        "open": 2,
        "click": 2,
        "unsubscribe": 1,
        "complaint": 1,
    }
    assert len(bad) == 1
    assert "999" in bad[0].error
    assert {e.broadcast_id for e in events} == {"job-1"}
    assert all(e.extra["time_source"] == "pull" and e.extra["send_id"] == "555" for e in events)
    opens = [e for e in events if e.type is EventType.OPEN]
    assert [e.event_id for e in opens] == [
        event_id_for("mailup", esp_event_id="demo:opn:42:1000:1"),
        event_id_for("mailup", esp_event_id="demo:opn:42:1000:2"),
    ]
    clicks = [e for e in events if e.type is EventType.CLICK]
    assert clicks[1].event_id == event_id_for("mailup", esp_event_id="demo:clk:42:1000:2:https://x.com/a;b,c")
    unsubscribe = next(e for e in events if e.type is EventType.UNSUBSCRIBE)
    assert unsubscribe.event_id == event_id_for("mailup", esp_event_id="demo:uns:42:p0@example.com")
    # every round reads everything again, with the same event ids
    again = (await pulled(mailup, BROADCAST, cursors[-1])).items
    assert [i.event_id for i in again if isinstance(i, ResponseEvent)] == [e.event_id for e in events]


async def test_a_pull_resumes_from_a_stored_cursor(fake: FakeMailUp) -> None:
    _stats(fake)
    stored = '{"v":1,"ep":"UrlClickDetails","page":0}'
    mailup = make(fake, page_size=2)  # a new process: only the cursor survives
    first = await mailup.pull_responses(BROADCAST, stored)
    assert [i.type for i in first.items if isinstance(i, ResponseEvent)] == [EventType.CLICK] * 2
    assert first.more
    assert [c.path.rsplit("/", 1)[1] for c in fake.api_calls()] == ["UrlClickDetails"]
    restart = await mailup.pull_responses(BROADCAST, '{"v":0,"ep":"Nope"}')  # unusable: a new round
    assert fake.api_calls()[-1].path.endswith("/Recipients")
    assert orjson.loads(restart.cursor or "") == {"v": 1, "ep": "Recipients", "page": 1}


async def test_the_servers_page_size_is_used(fake: FakeMailUp) -> None:
    _stats(fake)
    fake.page_cap = 2
    mailup = make(fake)  # asks 500, gets 2
    page = await mailup.pull_responses(BROADCAST, None)
    assert (len(page.items), orjson.loads(page.cursor or "")) == (2, {"v": 1, "ep": "Recipients", "page": 1})
    assert fake.api_calls()[0].query["pageSize"] == "500"


async def test_with_the_export_only_unsubscriptions_are_pulled(fake: FakeMailUp) -> None:
    _stats(fake)
    mailup = make(fake, statistics_source="export")
    assert mailup.response_sources == (ResponseSource("statistics", "*.csv"),)
    assert make(fake).response_sources == ()
    pulls = await pulled(mailup, BROADCAST, None)
    assert len(pulls.cursors) == 1  # one page ends the round
    assert {i.type for i in pulls.items if isinstance(i, ResponseEvent)} == {
        EventType.UNSUBSCRIBE,
        EventType.COMPLAINT,
    }


# --- statistics export ---------------------------------------------------------------------------------

EXPORT_HEADER = (
    "idList;idInvio;idNl;e-mail address;subject;statusType;details;statusChange;sentDate;"
    "CommunicationKey;EspbridgeJob"
)
EXPORT_ROWS = [
    "1;555;42;anna@example.com;November;SNT;;20261122T110003;20261122T110003;K-1;42:job-1",  # 2
    '1;555;42;anna@example.com;"Nov; ""x""";CLK;"https://x.com/?a=1;b=2";20260715T120000;;K-1;42:job-1',  # 3
    "1;555;42;bob@example.com;November;NCO;5.1.1;20261025T023000;;K-2;42:job-1",  # 4: repeated hour
    "1;555;42;carl@example.com;November;NCO;452;20261122T110004;;K-3;42:job-1",  # 5
    "1;555;42;dora@example.com;November;XXX;;20261122T110005;;K-4;42:job-1",  # 6
    "1;555;42;dora@example.com;November;OPN;;2026-13-45;;K-4;42:job-1",  # 7
    "1;555;42;dora@example.com;November;OPN;;20261122T110005;;K-4",  # 8: a column short
    "1;555;42;dora@example.com;November;NCO;999;20261122T110005;;K-4;42:job-1",  # 9
    "1;555;42;dora@example.com;November;CLK;;20261122T110005;;K-4;42:job-1",  # 10
    "1;555;42;;November;OPN;;20261122T110005;;K-4;42:job-1",  # 11
    "1;555;42;eve@example.com;November;OPN;;20261122T110005;;K-5;43:job-2",  # 12: re-imported
    "1;555;42;fay@example.com;November;OPN;;20261122T110005;;K-6;",  # 13: not espbridge's
    "2;555;42;gus@example.com;November;OPN;;20261122T110005;;K-7;42:job-1",  # 14: another list
    "1;556;44;hal@example.com;November;OPN;;20261122T110006;;K-8;44:job:with:colons",  # 15
]


def _export(tmp_path: Path, rows: list[str], **options: Any) -> list[ResponseEvent | BadRow]:
    path = tmp_path / "statistics_20261122T120000_1.csv"
    path.write_bytes("\r\n".join([EXPORT_HEADER, *rows, ""]).encode("utf-8"))
    return list(offline(**options).parse_response_file(path, "mailup/demo/statistics/" + path.name))


def test_export_rows_become_events_in_italian_time(tmp_path: Path) -> None:
    items = _export(tmp_path, EXPORT_ROWS)
    events = {i.source.line or 0: i for i in items if isinstance(i, ResponseEvent)}
    bad = {i.line: i.error for i in items if isinstance(i, BadRow)}
    assert sorted(events) == [2, 3, 4, 5, 15]
    assert [events[n].type for n in (2, 3, 4, 5)] == [
        EventType.SENT,
        EventType.CLICK,
        EventType.BOUNCE_HARD,
        EventType.BOUNCE_SOFT,
    ]
    assert events[2].occurred_at == datetime(2026, 11, 22, 10, 0, 3, tzinfo=UTC)  # CET
    assert events[3].occurred_at == datetime(2026, 7, 15, 10, 0, tzinfo=UTC)  # CEST
    assert events[4].occurred_at == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # first 02:30 (CEST)
    assert events[3].url == "https://x.com/?a=1;b=2"
    assert (events[2].broadcast_id, events[2].esp_message_id, events[2].communication_key) == (
        "job-1",
        "42",
        "K-1",
    )
    assert events[4].extra == {"send_id": "555", "bounce_code": "5.1.1"}
    assert events[15].broadcast_id == "job:with:colons"
    assert events[2].event_id == event_id_for(
        "mailup",
        broadcast_id="job-1",
        recipient="anna@example.com",
        event_type="sent",
        occurred_at=events[2].occurred_at,
    )
    assert sorted(bad) == [6, 7, 8, 9, 10, 11, 12]
    assert "unknown statusType 'XXX'" in bad[6]
    assert "2026-13-45" in bad[7]
    assert "10 fields, want 11" in bad[8]
    assert "'999'" in bad[9]
    assert "CLK without a URL" in bad[10]
    assert "empty email" in bad[11]
    assert "later job" in bad[12]
    again = _export(tmp_path, EXPORT_ROWS[:1])
    assert isinstance(again[0], ResponseEvent)
    assert again[0].event_id == events[2].event_id


def test_export_columns_are_found_by_header_and_are_configurable(tmp_path: Path) -> None:
    header = "statusType;EspbridgeJob;idNl;idList;email;details;statusChange"
    path = tmp_path / "s.csv"
    path.write_text(f"{header}\nOPN;42:job-1;42;1;a@x.com;;2026-11-22 11:00:00\n", encoding="utf-8")
    mailup = offline(export_columns={"email": "email"}, export_date_format="%Y-%m-%d %H:%M:%S")
    (event,) = mailup.parse_response_file(path, "mailup/demo/statistics/s.csv")
    assert isinstance(event, ResponseEvent)
    assert (event.email, event.communication_key, event.occurred_at) == (
        "a@x.com",
        None,
        datetime(2026, 11, 22, 10, tzinfo=UTC),
    )
    (rejected,) = offline().parse_response_file(path, "mailup/demo/statistics/s.csv")
    assert isinstance(rejected, BadRow)
    assert (rejected.line, rejected.error) == (1, "header lacks e-mail address")


# --- webhook ---------------------------------------------------------------------------------------------

WEBHOOK = {
    "Secret": "s3cr3t",
    "EventType": "Unsubscribe",
    "EventSource": "Recipient",
    "EventDate": "2026-11-22T12:00:03.695+01",
    "IdList": "1",
    "IdNL": "42",
    "Email": "anna@example.com",
    "Reason": "1",
    "Job": "42:job-1",
    "Key": "K-1",
}


Hooked = list[ResponseEvent | SubscriptionChange | BadRow]


def _hook(mailup: MailUpConnector, **changes: str | None) -> Hooked:
    form = {k: v for k, v in {**WEBHOOK, **changes}.items() if v is not None}
    return mailup.parse_webhook(
        {"Content-Type": "application/x-www-form-urlencoded"}, urlencode(form).encode()
    )


def test_the_unsubscribe_webhook_yields_the_apis_event() -> None:
    mailup = offline()
    body = (
        b"Secret=s3cr3t&EventType=Unsubscribe&EventSource=Recipient&EventDate=2026-11-22T12%3A00%3A03.695%2B01"
        b"&IdList=1&IdNL=42&Email=anna%40example.com&Reason=1&Job=42%3Ajob-1&Key=K-1"
    )
    (event,) = mailup.parse_webhook({}, body)
    assert isinstance(event, ResponseEvent)
    assert (event.type, event.broadcast_id, event.email, event.communication_key) == (
        EventType.UNSUBSCRIBE,
        "job-1",
        "anna@example.com",
        "K-1",
    )
    assert event.occurred_at == datetime(2026, 11, 22, 11, 0, 3, 695000, tzinfo=UTC)
    assert event.event_id == event_id_for("mailup", esp_event_id="demo:uns:42:anna@example.com")
    (complaint,) = _hook(mailup, Reason="2", EventDate="2026-11-22T12:00:03+0100")
    assert isinstance(complaint, ResponseEvent)
    assert complaint.type is EventType.COMPLAINT
    assert complaint.occurred_at == datetime(2026, 11, 22, 11, 0, 3, tzinfo=UTC)
    assert _hook(mailup, Reason="3") == []  # automatic, after a hard bounce: the Bounces endpoint has it
    for not_from_a_message in (
        _hook(mailup, EventType="Subscribe"),
        _hook(mailup, IdNL="0"),
        _hook(mailup, IdNL=""),
    ):
        (change,) = not_from_a_message  # a change of the list (test_mailup_contacts)
        assert isinstance(change, SubscriptionChange)


def test_the_page_gives_the_webhook_parameters_the_connector_reads() -> None:
    page = (ROOT / "docs" / "connectors" / "mailup.md").read_text(encoding="utf-8")
    configured = "&".join(f"{name}={value}" for name, value in offline().options.webhook_parameters())
    assert f"`{configured}`" in page


def test_the_webhook_reads_the_parameter_names_the_account_gave() -> None:
    mailup = offline(webhook_params={"secret": "k", "job": "j", "key": "ck", "message_id": "nl"})
    form = {"k": "s3cr3t", "EventDate": "2026-11-22T12:00:03.695+01", "nl": "42", "Email": "anna@example.com"}
    (event,) = mailup.parse_webhook({}, urlencode({**form, "j": "42:job-1", "ck": "K-1"}).encode())
    assert isinstance(event, ResponseEvent)
    assert (event.type, event.broadcast_id, event.communication_key) == (
        EventType.UNSUBSCRIBE,
        "job-1",
        "K-1",
    )
    (change,) = mailup.parse_webhook({}, urlencode({**form, "Job": "42:job-1"}).encode())  # no "j"
    assert isinstance(change, SubscriptionChange)  # no job: a change of the list, not the job's event
    with pytest.raises(WebhookAuthError, match="no k"):
        mailup.parse_webhook({}, urlencode({"Secret": "s3cr3t"}).encode())


def test_webhook_secret_is_required() -> None:
    mailup = offline()
    with pytest.raises(WebhookAuthError, match="wrong"):
        _hook(mailup, Secret="guess")
    with pytest.raises(WebhookAuthError, match="no Secret"):
        _hook(mailup, Secret=None)
    with pytest.raises(WebhookAuthError, match="no webhook secret configured"):
        _hook(offline(secret=None))


def test_webhook_items_that_do_not_fit_are_bad_rows() -> None:
    mailup = offline()
    (mismatch,) = _hook(mailup, Job="43:job-2")
    assert isinstance(mismatch, BadRow)
    assert "later job" in mismatch.error
    assert b"s3cr3t" not in mismatch.raw
    (bad_date,) = _hook(mailup, EventDate="22/11/2026")
    assert isinstance(bad_date, BadRow)
    (no_offset,) = _hook(mailup, EventDate="2026-11-22T12:00:03")
    assert isinstance(no_offset, BadRow)
    assert "offset" in no_offset.error


def _ids(items: Iterator[ResponseEvent | BadRow] | Hooked) -> list[Any]:
    return [i.event_id for i in items if isinstance(i, ResponseEvent)]


async def test_api_and_webhook_unsubscribes_share_an_event_id(fake: FakeMailUp) -> None:
    _stats(fake)
    mailup = make(fake, statistics_source="export")
    page = await mailup.pull_responses(BROADCAST, None)
    hook = _hook(mailup, Email="p0@example.com", Job="42:job-1")
    assert _ids(hook)[0] in _ids(list(page.items))
