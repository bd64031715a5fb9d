"""The sandbox ESP's ``mailup`` flavor as a client sees it (docs/connectors/mailup.md).

OAuth2 tokens, the console and statistics services under the account base, the statistics export
files in ``statistics/`` and the unsubscribe webhook. The sandbox runs as a real process; the tests
speak HTTP to it and read its files, with no espbridge code involved.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from aiohttp import web

from tests.fixtures.sandbox import (
    BUSY_RATES,
    EVENT_TYPES,
    SandboxClient,
    Sandboxes,
    WebhookReceiver,
)
from tests.fixtures.waits import wait_for

CONSOLE = "/API/v1.1/Rest/ConsoleService.svc"
STATS = "/API/v1.1/Rest/MailStatisticsService.svc"
TOKEN_PATH = "/Authorization/OAuth/Token"
FLAVOR = "mailup"
FIELDS = {
    "FirstName": 1,
    "LastName": 2,
    "Company": 3,
    "City": 4,
    **{f"Field{n:02d}": n for n in range(5, 38)},
    "CommunicationKey": 38,
    "EspbridgeJob": 39,
}
"""The flavor's default fields: all 39 of a MailUp account, the key and the job in the last two."""
KINDS = ("Recipients", "Bounces", "Views", "UrlClickDetails", "Unsubscriptions")
# The export's columns as docs/connectors/mailup.md documents them, written out here.
EXPORT_HEADER = [
    "idList",
    "idInvio",
    "idNl",
    "e-mail address",
    "subject",
    "statusType",
    "details",
    "statusChange",
    "sentDate",
    "CommunicationKey",
    "EspbridgeJob",
]
EXPORT_NAME_RE = re.compile(r"^statistics/statistics_\d{8}T\d{6}_\d+\.csv$")
API_TIME_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ$")
ROME = ZoneInfo("Europe/Rome")


class Client:
    """A MailUp API client as the doc describes it: OAuth2 password grant, then bearer calls."""

    def __init__(self, esp: SandboxClient, account: str | None = None) -> None:
        self.http = esp.http
        self.esp = esp
        self.base = esp.api(account)
        self.account = account or esp.account
        self.access = ""
        self.refresh = ""

    async def grant(self, **fields: str) -> tuple[int, Any]:
        async with self.http.post(self.base + TOKEN_PATH, data=fields) as resp:
            return resp.status, orjson.loads(await resp.read())

    async def login(self) -> dict[str, Any]:
        status, body = await self.grant(
            grant_type="password",
            client_id="espbridge",
            client_secret=self.esp.token,
            username=self.account,
            password=self.esp.token,
        )
        assert status == 200, body
        self.access, self.refresh = body["access_token"], body["refresh_token"]
        return dict(body)

    async def call(
        self,
        method: str,
        path: str,
        *,
        service: str = CONSOLE,
        params: dict[str, str | int] | None = None,
        body: Any = None,
        token: str | None = None,
        retry_429: bool = True,
    ) -> tuple[int, Any, dict[str, str]]:
        """One call; a 429 is waited out (``Retry-After``) and repeated unless ``retry_429`` is off."""
        headers = {
            "Authorization": f"Bearer {self.access if token is None else token}",
            "Accept": "application/json",
        }
        query = {k: str(v) for k, v in (params or {}).items()}
        deadline = time.monotonic() + 10
        while True:
            async with self.http.request(
                method, self.base + service + path, params=query, json=body, headers=headers
            ) as resp:
                answer = (resp.status, orjson.loads(await resp.read()), dict(resp.headers))
            if answer[0] != 429 or not retry_429:
                return answer
            assert time.monotonic() < deadline, "rate-limited for too long"
            await asyncio.sleep(float(answer[2].get("Retry-After", "1")))

    async def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        status, body, _ = await self.call(method, path, **kwargs)
        assert status == 200, (method, path, status, body)
        return body

    async def group(self, name: str) -> int:
        """The group of that name, created if missing (as ``start_import`` does)."""
        found = await self.ok("GET", "/Console/List/1/Groups", params={"filterby": f"Name=='{name}'"})
        if found["Items"]:
            return int(found["Items"][0]["idGroup"])
        created = await self.ok(
            "POST", "/Console/List/1/Group", body={"Name": name, "Notes": "test", "Deletable": True}
        )
        return int(created["idGroup"])

    async def import_done(self, import_id: int) -> dict[str, Any]:
        async def done() -> dict[str, Any] | None:
            body: dict[str, Any] = await self.ok("GET", f"/Console/Imports/{import_id}")
            return body if body["StatusCode"] in (3, 4) else None

        body: dict[str, Any] = await wait_for(done, 10, 0.02, what=f"import {import_id}")
        return body

    async def import_job(self, job: str, message: int, count: int, prefix: str = "user") -> tuple[int, int]:
        """Import ``count`` recipients for a job into its group; (group id, import id)."""
        group = await self.group(f"espbridge-{job}")
        rows = [
            recipient(f"{prefix}{i}@example.com", f"{prefix}-{i}", f"{message}:{job}") for i in range(count)
        ]
        import_id = await self.ok("POST", f"/Console/Group/{group}/Recipients", body=rows)
        assert (await self.import_done(import_id))["StatusCode"] == 3
        return group, import_id

    async def pull(self, message: int, page_size: int) -> dict[str, list[dict[str, Any]]]:
        """Every statistics endpoint of a message, page by page, as the connector pulls them."""
        out: dict[str, list[dict[str, Any]]] = {}
        for kind in KINDS:
            items: list[dict[str, Any]] = []
            number = 0
            while True:
                env = await self.ok(
                    "GET",
                    f"/Message/{message}/List/{kind}",
                    service=STATS,
                    params={"pageSize": page_size, "pageNumber": number},
                )
                assert env["IsPaginated"] is True
                assert (env["PageNumber"], env["PageSize"]) == (number, page_size)
                assert env["Skipped"] == number * page_size
                assert len(env["Items"]) <= page_size
                items.extend(env["Items"])
                if (number + 1) * env["PageSize"] >= env["TotalElementsCount"]:
                    break
                number += 1
            out[kind] = items
        return out


def recipient(email: str, key: str, job: str, first: str = "Anna") -> dict[str, Any]:
    return {
        "Email": email,
        "Name": "",
        "Fields": [
            {"Id": FIELDS["CommunicationKey"], "Value": key},
            {"Id": FIELDS["EspbridgeJob"], "Value": job},
            {"Id": FIELDS["FirstName"], "Value": first},
            {"Id": FIELDS["City"], "Value": ""},
        ],
    }


def api_counts(pulled: dict[str, list[dict[str, Any]]], message: int) -> dict[str, int]:
    """The espbridge events the statistics items stand for (the doc's table)."""
    counts = dict.fromkeys(EVENT_TYPES, 0)
    counts["sent"] = len(pulled["Recipients"])
    for item in pulled["Bounces"]:
        counts["bounce_hard" if item["Code"].startswith("5") else "bounce_soft"] += 1
        assert item["Code"] in ("5.1.1", "550", "4.2.2", "452"), item
    counts["open"] = sum(item["Count"] for item in pulled["Views"])
    counts["click"] = sum(item["Count"] for item in pulled["UrlClickDetails"])
    for item in pulled["Unsubscriptions"]:
        counts["unsubscribe" if item["Reason"] in (0, 1) else "complaint"] += 1
        assert item["Reason"] in (1, 2), item
    for kind, items in pulled.items():
        keys = [(i["IdRecipient"], i.get("Url", "")) for i in items]
        assert keys == sorted(keys), f"{kind} not in IdRecipient order"
        assert len(keys) == len(set(keys)), f"{kind} repeats an item"
        assert all(i["IdMessage"] == message and "@" in i["Email"] for i in items)
    return counts


def read_export(esp: SandboxClient, files: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """The good and the bad rows of the export files, as the connector's reader tells them apart."""
    good: list[list[str]] = []
    bad: list[list[str]] = []
    for name in files:
        assert EXPORT_NAME_RE.fullmatch(name), name
        data = (esp.account_dir() / name).read_bytes()
        assert data.endswith(b"\r\n"), name
        assert b"\n" not in data.replace(b"\r\n", b""), name
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline=""), delimiter=";"))
        assert rows[0] == EXPORT_HEADER
        for row in rows[1:]:
            (good if export_row_ok(row) else bad).append(row)
    return good, bad


def export_row_ok(row: list[str]) -> bool:
    if len(row) != len(EXPORT_HEADER) or row[5] not in ("SNT", "OPN", "CLK", "NCO") or not row[3]:
        return False
    try:
        datetime.strptime(row[7], "%Y%m%dT%H%M%S")
    except ValueError:
        return False
    if row[5] == "CLK":
        return bool(row[6])
    return row[5] != "NCO" or re.match(r"^[45]", row[6]) is not None


def export_counts(rows: list[list[str]]) -> dict[str, int]:
    counts = dict.fromkeys(EVENT_TYPES, 0)
    for row in rows:
        status = row[5]
        if status == "NCO":
            counts["bounce_hard" if row[6].startswith("5") else "bounce_soft"] += 1
        else:
            counts[{"SNT": "sent", "OPN": "open", "CLK": "click"}[status]] += 1
    return counts


def bad_kind(row: list[str]) -> str:
    """Which of the doc's kinds a bad export row is."""
    if len(row) == len(EXPORT_HEADER) - 1:
        return "short"
    if row[5] == "XXX":
        return "XXX"
    if row[7] == "2026-13-45":
        return "date"
    assert (row[5], row[6]) == ("NCO", "999"), row
    return "999"


def without_unsubscribes(counts: dict[str, int]) -> dict[str, int]:
    return {**counts, "unsubscribe": 0, "complaint": 0}


@pytest.fixture
async def webhooks() -> AsyncIterator[WebhookReceiver]:
    """espbridge's MailUp webhook endpoint: the first call is refused (503), the others taken (204)."""
    receiver = WebhookReceiver()
    receiver.answer = lambda call: web.Response(status=503 if call is receiver.calls[0] else 204)
    async with receiver:
        yield receiver


# Tests


async def test_token_grants_refresh_and_expiry(sandbox: Sandboxes) -> None:
    settings = {"accounts": "demo,other", "token_ttl_s": "1", "rate_limit_per_s": "0"}
    with sandbox(FLAVOR, **settings) as esp:
        client, http = Client(esp), esp.http
        good = {
            "grant_type": "password",
            "client_id": "espbridge",
            "client_secret": esp.token,
            "username": "demo",
            "password": esp.token,
        }
        for change in (
            {"password": "wrong"},
            {"client_secret": "wrong"},
            {"client_id": ""},
            {"username": "other"},
            {"username": ""},
        ):
            status, body = await client.grant(**{**good, **change})
            assert (status, body["error"]) == (400, "invalid_grant"), change
            assert body["error_description"]
        status, body = await client.grant(**{**good, "grant_type": "client_credentials"})
        assert (status, body["error"]) == (400, "unsupported_grant_type")

        granted = await client.login()
        assert granted["expires_in"] == 1
        assert granted["access_token"]
        assert granted["refresh_token"]
        assert await client.ok("GET", "/Console/Recipient/DynamicFields")

        invalid = {
            "ErrorCode": "401",
            "ErrorDescription": "Authorization error: Invalid access token",
            "ErrorName": "Unauthorized",
            "ErrorStack": None,
        }
        for token in ("", "not-a-token", esp.token):
            status, body, _ = await client.call("GET", "/Console/Recipient/DynamicFields", token=token)
            assert (status, body) == (401, invalid), token
        # A token is the account's own; the sandbox stats take the sandbox token instead.
        other = Client(esp, "other")
        status, body, _ = await other.call("GET", "/Console/Recipient/DynamicFields", token=client.access)
        assert (status, body) == (401, invalid)
        async with http.get(
            client.base + "/_sandbox/stats", headers={"Authorization": f"Bearer {client.access}"}
        ) as resp:
            assert resp.status == 401
        assert await client.esp.stats() == {
            "sends_created": {},
            "sends_cancelled": {},
            "imports_created": {},
            "rate_limited": 0,
            "tokens_issued": 1,
        }

        # Refresh: a new pair; the used refresh token is spent.
        old_refresh = client.refresh
        status, body = await client.grant(
            grant_type="refresh_token",
            client_id="espbridge",
            client_secret=esp.token,
            refresh_token=old_refresh,
        )
        assert status == 200
        assert body["refresh_token"] != old_refresh
        assert body["access_token"] != client.access
        client.access, client.refresh = body["access_token"], body["refresh_token"]
        status, body = await client.grant(
            grant_type="refresh_token",
            client_id="espbridge",
            client_secret=esp.token,
            refresh_token=old_refresh,
        )
        assert (status, body["error"]) == (400, "invalid_grant")

        # After TOKEN_TTL_S the token answers the confirmed 401; a refresh brings a working one.
        async def expired() -> dict[str, Any] | None:
            status, body, _ = await client.call("GET", "/Console/Recipient/DynamicFields")
            return body if status == 401 else None

        body = await wait_for(expired, 5, 0.02, what="the access token to expire")
        assert body == {**invalid, "ErrorDescription": "Authorization error: Access token is expired"}
        status, body = await client.grant(
            grant_type="refresh_token",
            client_id="espbridge",
            client_secret=esp.token,
            refresh_token=client.refresh,
        )
        assert status == 200
        client.access = body["access_token"]
        assert await client.ok("GET", "/Console/Recipient/DynamicFields")


async def test_import_send_and_every_response_source(sandbox: Sandboxes, webhooks: WebhookReceiver) -> None:
    settings = {
        **BUSY_RATES,
        "rate_limit_per_s": "0",
        "bad_rows": "4",
        "rows_per_file": "40",
        "phase_delay_s": "0.3",
        "mailup_webhook_url": webhooks.url,
    }
    with sandbox(FLAVOR, **settings) as esp:
        client = Client(esp)
        assert sorted(p.name for p in esp.account_dir().iterdir() if not p.name.startswith(".")) == [
            "archive",
            "drop",
            "import",
            "manifest",
            "statistics",
        ]
        await client.login()
        fields = await client.ok("GET", "/Console/Recipient/DynamicFields", params={"pageSize": 100})
        assert {i["Description"]: i["Id"] for i in fields["Items"]} == FIELDS

        # The job's group: looked up by name, created when missing.
        name = "espbridge-job-1"
        for expression in (f"Name=='{name}'", f"\"Name=='{name}'\""):
            found = await client.ok("GET", "/Console/List/1/Groups", params={"filterby": expression})
            assert (found["Items"], found["TotalElementsCount"]) == ([], 0)
        created = await client.ok(
            "POST", "/Console/List/1/Group", body={"Name": name, "Notes": "November", "Deletable": True}
        )
        group = created["idGroup"]
        assert created == {
            "Deletable": True,
            "Name": name,
            "Notes": "November",
            "idGroup": group,
            "idList": 1,
        }
        for expression in (f"Name=='{name}'", f"\"Name=='{name}'\""):
            found = await client.ok("GET", "/Console/List/1/Groups", params={"filterby": expression})
            assert found["Items"] == [created]
        status, body, _ = await client.call("GET", "/Console/List/1/Groups", params={"filterby": "Name!='x'"})
        assert (status, body["ErrorCode"], body["ErrorName"]) == (400, "400", "BadRequest")
        status, body, _ = await client.call("GET", "/Console/List/9/Groups")
        assert (status, body["ErrorName"]) == (404, "NotFound")

        # The import: two chunks, queued one after the other.
        chunk1 = [recipient(f"user{i}@example.com", f"K-{i}", "42:job-1") for i in range(60)]
        chunk1 += [
            recipient("", "K-e", "42:job-1"),
            recipient("no-at.example.com", "K-a", "42:job-1"),
            recipient("two@at@example.com", "K-b", "42:job-1"),
            recipient("USER3@example.com", "K-3", "42:job-1"),
        ]
        chunk2 = [recipient(f"user{i}@example.com", f"K-{i}", "42:job-1") for i in range(60, 120)]
        chunk2.append(recipient("user5@example.com", "K-5", "42:job-1", first="Updated"))
        first = await client.ok("POST", f"/Console/Group/{group}/Recipients", body=chunk1)
        second = await client.ok("POST", f"/Console/Group/{group}/Recipients", body=chunk2)
        assert isinstance(first, int)
        assert isinstance(second, int)
        assert first != second
        seen: set[tuple[int, int]] = set()

        async def both_done() -> bool | None:
            a = await client.ok("GET", f"/Console/Imports/{first}")
            b = await client.ok("GET", f"/Console/Imports/{second}")
            seen.add((a["StatusCode"], b["StatusCode"]))
            return True if a["StatusCode"] == b["StatusCode"] == 3 else None

        await wait_for(both_done, 10, 0.02, what="the imports")
        assert any(2 in pair for pair in seen), f"running was never seen: {seen}"
        assert all(b <= 1 or a == 3 for a, b in seen), f"imports of one list run one at a time: {seen}"
        done1 = await client.ok("GET", f"/Console/Imports/{first}")
        assert (done1["IdImport"], done1["IdList"], done1["IdGroups"]) == (first, 1, [group])
        assert API_TIME_RE.fullmatch(done1["StartDate"])
        assert API_TIME_RE.fullmatch(done1["EndDate"])
        assert done1["Rows"] == {
            "Total": 64,
            "Valid": {
                "Total": 61,
                "EmailNew": 60,
                "EmailUpdate": 0,
                "RepeatedEmail": 1,
                "NumberNew": 0,
                "NumberUpdate": 0,
                "RepeatedNumber": 0,
            },
            "Invalid": {
                "Total": 3,
                "InvalidEmail": 2,
                "WithoutEmail": 1,
                "InvalidNumber": 0,
                "WithoutNumber": 0,
                "WithoutPrefix": 0,
            },
        }
        done2 = await client.ok("GET", f"/Console/Imports/{second}")
        assert done2["Rows"]["Valid"] == {
            **done1["Rows"]["Valid"],
            "Total": 61,
            "EmailNew": 60,
            "EmailUpdate": 1,
            "RepeatedEmail": 0,
        }
        assert done2["Rows"]["Invalid"]["Total"] == 0
        status, body, _ = await client.call("GET", "/Console/Imports/999999")
        assert (status, body) == (
            404,
            {
                "ErrorCode": "404",
                "ErrorDescription": body["ErrorDescription"],
                "ErrorName": "NotFound",
                "ErrorStack": None,
            },
        )
        for bad_body in (
            {"Email": "x@example.com"},
            [{"Email": "x@example.com", "Fields": [{"Id": 99, "Value": "v"}]}],
        ):
            status, body, _ = await client.call("POST", f"/Console/Group/{group}/Recipients", body=bad_body)
            assert status == 400, bad_body

        # Send: the sending waits in the Undefined queue until it is confirmed.
        for path, expected in (
            (f"/Console/Group/{group}/Email/0/Send", 404),
            ("/Console/Group/424242/Email/42/Send", 404),
            (f"/Console/Group/{group}/Email/x/Send", 400),
        ):
            status, body, _ = await client.call("POST", path)
            assert status == expected, (path, body)
        empty = await client.group("espbridge-empty")
        status, body, _ = await client.call("POST", f"/Console/Group/{empty}/Email/42/Send")
        assert status == 400
        sent = await client.ok("POST", f"/Console/Group/{group}/Email/42/Send")
        sending = sent["Id"]
        assert sent == {
            "Id": sending,
            "Sent": 120,
            "InvalidRecipients": [],
            "UnprocessedRecipients": [],
            "idMessage": 42,
        }
        undefined = await client.ok("GET", "/Console/Email/Sendings/Undefined")
        assert [(i["Id"], i["State"], i["IdMessage"], i["Subject"]) for i in undefined["Items"]] == [
            (sending, "Undefined", 42, "Message 42")
        ]
        for queue in ("Deferred", "Immediate"):
            assert (await client.ok("GET", f"/Console/Email/Sendings/{queue}"))["Items"] == []
        assert (await client.ok("GET", "/Console/List/1/Email/42/SendHistory"))["Items"] == []
        assert (await client.pull(42, 50))["Recipients"] == []

        confirmed = await client.ok("POST", f"/Console/Email/Sendings/{sending}/Immediate")
        assert (confirmed["Id"], confirmed["State"], confirmed["IdList"], confirmed["Type"]) == (
            sending,
            "Immediate",
            1,
            "Newsletter",
        )
        assert API_TIME_RE.fullmatch(confirmed["StartDate"])
        immediate = await client.ok("GET", "/Console/Email/Sendings/Immediate")
        assert [i["Id"] for i in immediate["Items"]] == [sending]
        # Confirming twice is harmless.
        assert (await client.ok("POST", f"/Console/Email/Sendings/{sending}/Immediate"))["Id"] == sending

        # Pull while the events are released; SendHistory's EndDate stays null until the last phase.
        history_states: set[bool] = set()
        deadline = time.monotonic() + 15
        manifest: dict[str, Any] | None = None
        while manifest is None or not manifest["complete"]:
            assert time.monotonic() < deadline, "the send did not complete"
            manifest = esp.manifest("job-1")
            history = await client.ok("GET", "/Console/List/1/Email/42/SendHistory")
            for item in history["Items"]:
                history_states.add(item["EndDate"] is None)
            await client.pull(42, 7)
            await asyncio.sleep(0.05)
        assert True in history_states, "delivery in progress was never seen"
        pulled = await client.pull(42, 7)
        assert pulled == await client.pull(42, 1000)
        history = await client.ok("GET", "/Console/List/1/Email/42/SendHistory")
        assert (history["IsPaginated"], history["TotalElementsCount"]) == (False, 1)
        [item] = history["Items"]  # MailUp's item, no sending id (test_mailup_shapes holds its fields)
        assert (item["idMessage"], item["Recipients"]) == (42, 120)
        assert API_TIME_RE.fullmatch(item["StartDate"])
        assert API_TIME_RE.fullmatch(item["EndDate"])
        for queue in ("Deferred", "Undefined", "Immediate"):
            assert (await client.ok("GET", f"/Console/Email/Sendings/{queue}"))["Items"] == []

        # Every source delivers exactly the manifest's events.
        assert set(manifest) >= {
            "broadcast_id",
            "send_id",
            "recipients",
            "counts",
            "files",
            "export_unattributable",
            "bad_rows",
            "complete",
        }
        assert (manifest["broadcast_id"], manifest["send_id"], manifest["recipients"]) == (
            "job-1",
            f"42:{sending}",
            120,
        )
        counts = manifest["counts"]
        assert (counts["sent"], counts["delivered"]) == (120, 0)
        assert all(counts[t] > 0 for t in EVENT_TYPES if t != "delivered"), counts
        assert api_counts(pulled, 42) == counts
        assert len({i["Email"] for i in pulled["Recipients"]}) == 120
        assert any(";" in i["Url"] for i in pulled["UrlClickDetails"])
        assert any("," in i["Url"] for i in pulled["UrlClickDetails"])

        good, bad = read_export(esp, manifest["files"])
        assert sorted(p.name for p in (esp.account_dir() / "statistics").iterdir()) == sorted(
            Path(f).name for f in manifest["files"]
        )
        assert export_counts(good) == without_unsubscribes(counts)
        assert len({(r[3], r[5], r[6], r[7]) for r in good}) == len(good), "two export rows alike"
        assert {(r[0], r[1], r[2], r[4]) for r in good} == {("1", str(sending), "42", "Message 42")}
        assert all(r[10] == "42:job-1" and r[9].startswith("K-") for r in good)
        assert manifest["export_unattributable"] == 0
        assert manifest["bad_rows"] == len(bad) == 4 * len(manifest["files"])
        assert Counter(bad_kind(r) for r in bad) == Counter(
            {kind: len(manifest["files"]) for kind in ("XXX", "date", "short", "999")}
        ), bad
        first_sent = next(r for r in good if r[5] == "SNT")
        sent_at = datetime.strptime(first_sent[7], "%Y%m%dT%H%M%S").replace(tzinfo=ROME)
        assert abs(sent_at - datetime.now(UTC)) < timedelta(minutes=5), "statusChange is Italian time"

        # The webhook: each unsubscribe and complaint, with the secret; a 503 is retried.
        wanted = counts["unsubscribe"] + counts["complaint"]

        async def all_hooks() -> list[dict[str, str]] | None:
            forms = [call.form for call in webhooks.calls[1:]]
            return forms if len(forms) >= wanted else None

        forms = await wait_for(all_hooks, 10, 0.02, what="the webhook calls")
        assert len(forms) == wanted
        assert webhooks.calls[0].form in forms, "the refused call was not repeated"
        assert {call.path for call in webhooks.calls} == {"/webhooks/demo"}
        by_email = {i["Email"]: i["Reason"] for i in pulled["Unsubscriptions"]}
        for form in forms:
            assert list(form) == [
                "Secret",
                "EventType",
                "EventSource",
                "EventDate",
                "IdList",
                "IdNL",
                "Email",
                "Reason",
                "Job",
                "Key",
            ]
            # Job=[Field39] and Key=[Field38]: the fields the import wrote them into.
            assert (form["Secret"], form["EventType"], form["IdList"], form["IdNL"], form["Job"]) == (
                esp.token,
                "Unsubscribe",
                "1",
                "42",
                "42:job-1",
            )
            assert int(form["Reason"]) == by_email[form["Email"]]
            assert form["Key"] == "K-" + form["Email"].removeprefix("user").split("@")[0]
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0[12]", form["EventDate"])

        assert await client.esp.stats() == {
            "sends_created": {"job-1": 1},
            "sends_cancelled": {},
            "imports_created": {"job-1": 2},
            "rate_limited": 0,
            "tokens_issued": 1,
        }
        # Hard-bounced, unsubscribed and complaining recipients left the list: a new Send (counted)
        # addresses the others.
        gone = counts["bounce_hard"] + counts["unsubscribe"] + counts["complaint"]
        again = await client.ok("POST", f"/Console/Group/{group}/Email/42/Send")
        assert (again["Sent"], again["Id"] != sending) == (120 - gone, True)
        assert (await client.esp.stats())["sends_created"] == {"job-1": 2}


async def test_deferred_and_list_sendings_without_export(sandbox: Sandboxes) -> None:
    settings = {"rate_limit_per_s": "0", "mailup_export": "false", "bad_rows": "3"}
    with sandbox(FLAVOR, **settings) as esp:
        client, http = Client(esp), esp.http
        await client.login()
        later_group, _ = await client.import_job("job-later", 7, 5, prefix="later")
        later = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%SZ")
        for refused in ('"tomorrow"', later):  # MailUp's form is quoted: datetime="2015-10-20 05:00:00Z"
            status, _, _ = await client.call(
                "POST", f"/Console/Group/{later_group}/Email/7/Send", params={"datetime": refused}
            )
            assert status == 400, refused
        deferred = await client.ok(
            "POST", f"/Console/Group/{later_group}/Email/7/Send", params={"datetime": f'"{later}"'}
        )
        queued = await client.ok("GET", "/Console/Email/Sendings/Deferred")
        assert [(i["Id"], i["State"], i["StartDate"]) for i in queued["Items"]] == [
            (deferred["Id"], "Deferred", later)
        ]
        assert (await client.ok("GET", "/Console/Email/Sendings/Undefined"))["Items"] == []
        # Confirming a deferred sending changes nothing.
        assert (await client.ok("POST", f"/Console/Email/Sendings/{deferred['Id']}/Immediate"))[
            "Id"
        ] == deferred["Id"]
        assert [i["Id"] for i in (await client.ok("GET", "/Console/Email/Sendings/Deferred"))["Items"]] == [
            deferred["Id"]
        ]
        # An Undefined sending is scheduled with POST Sendings/{id}/Deferred {"Date": …} (UTC).
        defer_group, _ = await client.import_job("job-defer", 9, 2, prefix="defer")
        undefined = await client.ok("POST", f"/Console/Group/{defer_group}/Email/9/Send")
        path = f"/Console/Email/Sendings/{undefined['Id']}/Deferred"
        status, _, _ = await client.call("POST", path, body={"Date": "soon"})
        assert status == 400
        scheduled = await client.ok("POST", path, body={"Date": later})
        assert (scheduled["Id"], scheduled["State"], scheduled["StartDate"]) == (
            undefined["Id"],
            "Deferred",
            later,
        )
        queued = await client.ok("GET", "/Console/Email/Sendings/Deferred")
        assert [i["Id"] for i in queued["Items"]] == [deferred["Id"], undefined["Id"]]

        # Into the list, sent to the list with a datetime in the past (and '+' for the space): at once.
        rows = [recipient(f"now{i}@example.com", f"N-{i}", "8:job-now") for i in range(8)]
        import_id = await client.ok("POST", "/Console/List/1/Recipients", body=rows)
        imported = await client.import_done(import_id)
        assert imported["IdGroups"] == []
        past = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%SZ")
        async with http.post(
            client.base + CONSOLE + f"/Console/List/1/Email/8/Send?datetime=%22{past.replace(' ', '+')}%22",
            headers={"Authorization": f"Bearer {client.access}"},
        ) as resp:
            assert resp.status == 200
            now_sent = await resp.json()
        assert now_sent["Sent"] == 15, "the whole list is addressed"
        manifest = await esp.complete_manifest("job-now", timeout_s=10)
        assert (manifest["recipients"], manifest["send_id"]) == (15, f"8:{now_sent['Id']}")
        assert (manifest["files"], manifest["bad_rows"], manifest["export_unattributable"]) == ([], 0, 0)
        assert list((esp.account_dir() / "statistics").iterdir()) == []
        history = await client.ok("GET", "/Console/List/1/Email/8/SendHistory")
        assert [(i["idMessage"], i["Recipients"]) for i in history["Items"]] == [(8, 15)]
        assert api_counts(await client.pull(8, 5), 8) == manifest["counts"]
        # The deferred one is still waiting; its message has no statistics yet.
        assert [i["Id"] for i in (await client.ok("GET", "/Console/Email/Sendings/Deferred"))["Items"]] == [
            deferred["Id"],
            undefined["Id"],
        ]
        assert (await client.pull(7, 5))["Recipients"] == []
        assert esp.manifest("job-later") is None
        stats = await client.esp.stats()
        assert stats["sends_created"] == {"job-later": 1, "job-defer": 1, "job-now": 1}
        assert stats["imports_created"] == {"job-later": 1, "job-defer": 1, "job-now": 1}

        # Paging: the cap, bad values, case-insensitive names.
        capped = await client.ok("GET", "/Console/Recipient/DynamicFields", params={"pageSize": 5000})
        assert (capped["PageSize"], capped["TotalElementsCount"], len(capped["Items"])) == (1000, 39, 39)
        second = await client.ok(
            "GET", "/Console/Recipient/DynamicFields", params={"PageSize": 4, "PageNumber": 9}
        )
        assert (second["Skipped"], [i["Id"] for i in second["Items"]]) == (36, [37, 38, 39])
        beyond = await client.ok(
            "GET", "/Console/Recipient/DynamicFields", params={"pageSize": 4, "pageNumber": 10}
        )
        assert (beyond["Items"], beyond["TotalElementsCount"]) == ([], 39)
        default = await client.ok("GET", "/Console/Recipient/DynamicFields")
        assert (default["PageSize"], len(default["Items"])) == (20, 20), "MailUp's default page size"
        bad_paging: list[dict[str, str | int]] = [{"pageSize": 0}, {"pageSize": "x"}, {"pageNumber": -1}]
        for params in bad_paging:
            status, _, _ = await client.call("GET", "/Console/Recipient/DynamicFields", params=params)
            assert status == 400, params
        status, _, _ = await client.call("GET", "/Message/8/List/Opens", service=STATS)
        assert status == 404


async def test_stop_takes_a_sending_out_of_its_queue_once_per_interval(sandbox: Sandboxes) -> None:
    with sandbox(FLAVOR, rate_limit_per_s="0", mailup_stop_interval_s="1") as esp:
        client = Client(esp)
        await client.login()
        later = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%SZ")
        group, _ = await client.import_job("job-deferred", 7, 3, prefix="d")
        deferred = await client.ok(
            "POST", f"/Console/Group/{group}/Email/7/Send", params={"datetime": f'"{later}"'}
        )
        group, _ = await client.import_job("job-undefined", 9, 3, prefix="u")
        undefined = await client.ok("POST", f"/Console/Group/{group}/Email/9/Send")

        assert await client.ok("POST", f"/Console/Email/Sendings/{deferred['Id']}/Stop") is None
        status, body, headers = await client.call(
            "POST", f"/Console/Email/Sendings/{undefined['Id']}/Stop", retry_429=False
        )
        assert (status, body["ErrorCode"], headers["Retry-After"]) == (429, "429", "1"), "one Stop a second"
        await client.ok("POST", f"/Console/Email/Sendings/{undefined['Id']}/Stop")  # after Retry-After
        await client.ok("POST", f"/Console/Email/Sendings/{undefined['Id']}/Immediate")  # changes nothing
        for queue in ("Undefined", "Deferred", "Immediate"):
            assert (await client.ok("GET", f"/Console/Email/Sendings/{queue}"))["Items"] == [], queue
        for message in (7, 9):
            assert (await client.ok("GET", f"/Console/List/1/Email/{message}/SendHistory"))["Items"] == []

        group, _ = await client.import_job("job-now", 8, 3, prefix="n")
        now = await client.ok("POST", f"/Console/Group/{group}/Email/8/Send")
        await client.ok("POST", f"/Console/Email/Sendings/{now['Id']}/Immediate")
        await esp.complete_manifest("job-now", timeout_s=10)
        status, body, _ = await client.call("POST", f"/Console/Email/Sendings/{now['Id']}/Stop")
        assert (status, body["ErrorDescription"]) == (
            400,
            f"Sending {now['Id']} is completed and cannot be stopped",
        )

        stats = await esp.stats()
        assert stats["sends_cancelled"] == {"job-deferred": 1, "job-undefined": 1}
        assert (esp.manifest("job-deferred"), esp.manifest("job-undefined")) == (None, None)


async def test_over_the_limit_answers_429(sandbox: Sandboxes) -> None:
    with sandbox(FLAVOR) as esp:
        client = Client(esp)
        await client.login()
        answers = [
            await client.call("GET", "/Console/Recipient/DynamicFields", retry_429=False) for _ in range(12)
        ]
        statuses = [status for status, _, _ in answers]
        assert statuses[:5] == [200] * 5, statuses
        limited = [(body, headers) for status, body, headers in answers if status == 429]
        assert len(limited) >= 4, statuses
        for body, headers in limited:
            assert body == {
                "ErrorCode": "429",
                "ErrorDescription": "Authorization error (too_many_requests): Too many requests. "
                "Max:5 calls per second , actual:6.",
                "ErrorName": None,
                "ErrorStack": None,
            }
            assert headers["Retry-After"] == "1"
        # Token calls are not limited; a refused token is refused before the limit counts; the
        # sandbox stats are not limited.
        await client.login()
        status, _, _ = await client.call(
            "GET", "/Console/Recipient/DynamicFields", token="nope", retry_429=False
        )
        assert status == 401
        for _ in range(6):
            stats = await client.esp.stats()
        assert stats["rate_limited"] == len(limited)

        async def accepted() -> bool | None:
            status, _, _ = await client.call("GET", "/Console/Recipient/DynamicFields", retry_429=False)
            return True if status == 200 else None

        await wait_for(accepted, 3, 0.02, what="the window to move on")


async def test_restart_resumes_without_sending_twice(sandbox: Sandboxes) -> None:
    settings = {
        **BUSY_RATES,
        "rate_limit_per_s": "0",
        "phase_delay_s": "0.25",
        "rows_per_file": "30",
    }
    with sandbox(FLAVOR, **settings) as esp:
        client = Client(esp)
        await client.login()
        group, import_id = await client.import_job("job-r", 5, 80)
        other_group, _ = await client.import_job("job-u", 6, 3, prefix="undef")
        undefined = await client.ok("POST", f"/Console/Group/{other_group}/Email/6/Send")
        sending = (await client.ok("POST", f"/Console/Group/{group}/Email/5/Send"))["Id"]
        await client.ok("POST", f"/Console/Email/Sendings/{sending}/Immediate")

        async def some_released() -> dict[str, Any] | None:
            manifest = esp.manifest("job-r")
            return manifest if manifest is not None and manifest["counts"]["sent"] > 0 else None

        partial = await wait_for(some_released, 10, 0.02, what="the first phase")
        assert not partial["complete"]
        assert esp.stop(signal.SIGTERM) == 0
        old_token = client.access

    with sandbox(FLAVOR, root=esp.root, **settings) as esp:
        client = Client(esp)
        status, body, _ = await client.call("GET", "/Console/Recipient/DynamicFields", token=old_token)
        assert (status, body["ErrorDescription"]) == (401, "Authorization error: Invalid access token")
        await client.login()
        manifest = await esp.complete_manifest("job-r", timeout_s=10)
        # Nothing sent, imported or released twice; the state survived.
        assert await client.esp.stats() == {
            "sends_created": {"job-r": 1, "job-u": 1},
            "sends_cancelled": {},
            "imports_created": {"job-r": 1, "job-u": 1},
            "rate_limited": 0,
            "tokens_issued": 1,
        }
        assert (await client.ok("GET", f"/Console/Imports/{import_id}"))["StatusCode"] == 3
        assert await client.group("espbridge-job-r") == group
        assert [i["Id"] for i in (await client.ok("GET", "/Console/Email/Sendings/Undefined"))["Items"]] == [
            undefined["Id"]
        ]
        await client.ok("POST", f"/Console/Email/Sendings/{sending}/Immediate")
        pulled = await client.pull(5, 25)
        assert api_counts(pulled, 5) == manifest["counts"]
        assert manifest["counts"]["sent"] == 80
        good, bad = read_export(esp, manifest["files"])
        assert bad == []
        assert len(set(manifest["files"])) == len(manifest["files"])
        assert sorted(p.name for p in (esp.account_dir() / "statistics").iterdir()) == sorted(
            Path(f).name for f in manifest["files"]
        )
        assert export_counts(good) == without_unsubscribes(manifest["counts"])
        [item] = (await client.ok("GET", "/Console/List/1/Email/5/SendHistory"))["Items"]
        assert (item["idMessage"], item["Recipients"]) == (5, 80)
        assert item["EndDate"] is not None
        assert await client.esp.stats() == {
            "sends_created": {"job-r": 1, "job-u": 1},
            "sends_cancelled": {},
            "imports_created": {"job-r": 1, "job-u": 1},
            "rate_limited": 0,
            "tokens_issued": 1,
        }


async def test_rows_of_recipients_imported_for_a_later_job(sandbox: Sandboxes) -> None:
    settings = {"rate_limit_per_s": "0", "phase_delay_s": "0.3", "rate_open": "0.9"}
    with sandbox(FLAVOR, **settings) as esp:
        client = Client(esp)
        await client.login()
        group, _ = await client.import_job("job-a", 1, 30, prefix="shared")
        sending = (await client.ok("POST", f"/Console/Group/{group}/Email/1/Send"))["Id"]
        await client.ok("POST", f"/Console/Email/Sendings/{sending}/Immediate")

        async def sent_released() -> bool | None:
            status, body, _ = await client.call("GET", "/Message/1/List/Recipients", service=STATS)
            return True if status == 200 and body["TotalElementsCount"] > 0 else None

        await wait_for(sent_released, 10, 0.02, what="the sent phase")
        # The same people imported for job B (message 2) while job A's rows are still released.
        await client.import_job("job-b", 2, 30, prefix="shared")
        manifest = await esp.complete_manifest("job-a", timeout_s=10)
        good, _ = read_export(esp, manifest["files"])
        foreign = [r for r in good if r[10].partition(":")[0] != r[2]]
        assert {r[10] for r in foreign} <= {"2:job-b"}
        assert manifest["export_unattributable"] == len(foreign) > 0
        assert export_counts(good) == without_unsubscribes(manifest["counts"])
        assert api_counts(await client.pull(1, 100), 1) == manifest["counts"]
