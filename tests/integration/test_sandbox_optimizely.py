"""The sandbox ESP's ``optimizely`` flavor as a client sees it (docs/connectors/optimizely.md).

REST under ``/rest/{clientId}`` with HTTP Basic, batch sending, campaign status and report, bounces
asked for by mailing and recipients (``/responses`` has no ``offset``), the batch's recipient list
and unsubscribes paged by ``offset``/``limit``, ``Response_*.csv`` files on the SFTP site and
webhook calls to a receiver running in the test. The sandbox runs as a real process; the tests
speak HTTP to it and read its files, and use no espbridge code.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import re
import signal
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import orjson
from aiohttp import web

from tests.fixtures.contract import ContractCalls, contract_calls
from tests.fixtures.sandbox import (
    BUSY_RATES,
    EVENT_TYPES,
    OPTIMIZELY_USER,
    SandboxClient,
    Sandboxes,
    WebhookCall,
    WebhookReceiver,
    basic,
)
from tests.fixtures.waits import wait_for

FLAVOR = "optimizely"
USER = OPTIMIZELY_USER
BERLIN = ZoneInfo("Europe/Berlin")
# The response file's columns as docs/connectors/optimizely.md documents them, written out here.
HEADER = [
    "Email",
    "Urn",
    "CommunicationKey",
    "MessageType",
    "DeliveryDate",
    "ClickUrl",
    "ClickDate",
    "EventTriggeredDate",
    "BounceType",
    "BroadcastId",
]
FILE_TYPES = {
    ("Send", ""): "sent",
    ("Bounce", "hardbounce"): "bounce_hard",
    ("Bounce", "softbounce"): "bounce_soft",
    ("Open", ""): "open",
    ("Click", ""): "click",
    ("Unsubscription", ""): "unsubscribe",
}
HOOK_TYPES = {
    "sent": "sent",
    "open": "open",
    "click": "click",
    "unsubscribe": "unsubscribe",
    "spamcomplaint": "complaint",
}
FILE_NAME_RE = re.compile(r"^Response_(\d+)_\d{14}_(\d{3})\.csv$")
REST_TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0[12]:00$")
HOOK_SECRET = "hook-secret"
HOOK_AUTH = orjson.dumps({"type": "basicAuth", "userName": "espbridge", "password": HOOK_SECRET}).decode()

Fact = tuple[str, str, int, str]
"""(recipient id, espbridge type, UTC second, url): what identifies an event across sources."""


# Helpers


class Client:
    """Calls ``/rest/{clientId}/…`` with HTTP Basic, as the doc says; every answer it reads is held
    to Optimizely's OpenAPI document (``contract``, checked at the end of the test)."""

    def __init__(
        self, esp: SandboxClient, contract: ContractCalls, client_id: str = "demo", **auth: str
    ) -> None:
        self.esp = esp
        self.contract = contract
        self.http = esp.http
        self.client_id = client_id
        self.base = f"{esp.url}/rest/{client_id}"
        self.headers = basic(auth.get("user", USER), auth.get("password", esp.token))

    async def call(
        self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> tuple[int, Any, dict[str, str]]:
        all_headers = {"Accept": "application/json", **self.headers, **(headers or {})}
        async with self.http.request(method, f"{self.base}/{path}", headers=all_headers, **kwargs) as resp:
            raw = await resp.read()
            self.contract.answered(method, str(resp.url), resp.status, resp.headers, raw)
            return resp.status, orjson.loads(raw) if raw else None, dict(resp.headers)

    async def ok(self, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
        got, body, _ = await self.call(method, path, **kwargs)
        assert got == status, (method, path, got, body)
        return body

    async def create_batch(
        self, tag: str, campaign: str = "7000", action: str | None = "copy"
    ) -> tuple[int, Any, dict[str, str]]:
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("campaign", campaign)
        if action is not None:
            form.add_field("campaignAction", action)
        form.add_field("tag", tag)
        return await self.call("POST", "sending/batches", data=form())

    async def put(self, batch_id: int, chunk: str, people: list[Any]) -> Any:
        return await self.ok(
            "PUT", f"sending/batches/{batch_id}", json={"chunk": chunk, "recipients": people}
        )

    async def collect(self, path: str, page_size: int, **params: str) -> list[dict[str, Any]]:
        """Every element of a collection, page by page; the last page has fewer than ``limit``."""
        elements: list[dict[str, Any]] = []
        while True:
            query = {**params, "offset": str(len(elements)), "limit": str(page_size)}
            page = await self.ok("GET", path, params=query)
            assert (page["offset"], page["limit"], page["count"]) == (
                len(elements),
                page_size,
                len(page["elements"]),
            )
            assert page["count"] <= page_size
            elements.extend(page["elements"])
            if page["count"] < page_size:
                return elements

    async def stats(self) -> Any:
        return await self.esp.stats(self.client_id)


def person(i: int, job: str) -> dict[str, Any]:
    key = f"K{i}"
    data = {"email": f"user{i}@example.com", "CommunicationKey": key, "firstname": f'Anna "{i}"; Jr.'}
    return {"id": key, "data": {**data, "BroadcastId": job}}


def people(keys: Iterable[int], job: str) -> list[dict[str, Any]]:
    return [person(i, job) for i in keys]


def file_seconds(text: str) -> int:
    return int(datetime.strptime(text, "%d.%m.%Y %H:%M:%S").replace(tzinfo=BERLIN).timestamp())


def rest_seconds(text: str) -> int:
    assert REST_TIME_RE.fullmatch(text), text
    return int(datetime.fromisoformat(text).timestamp())


@dataclass
class FileRows:
    """The events of the response files, and their malformed rows."""

    facts: list[Fact] = field(default_factory=list)
    bad: list[list[str]] = field(default_factory=list)
    rows: list[dict[str, str]] = field(default_factory=list)


def read_files(esp: SandboxClient, names: Iterable[str], job: str) -> FileRows:
    out = FileRows()
    for name in names:
        text = (esp.account_dir() / name).read_text(encoding="utf-8")
        assert "\r" not in text
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=";")
        assert next(reader) == HEADER
        for row in reader:
            if len(row) != len(HEADER):
                out.bad.append(row)
                continue
            values = dict(zip(HEADER, row, strict=True))
            event_type = FILE_TYPES.get((values["MessageType"], values["BounceType"]))
            try:
                at = file_seconds(values["EventTriggeredDate"])
            except ValueError:
                event_type = None
            if event_type is None:
                out.bad.append(row)
                continue
            assert values["Urn"] == values["CommunicationKey"]
            assert values["BroadcastId"] == job
            assert values["Email"] == f"user{values['Urn'][1:]}@example.com"
            assert file_seconds(values["DeliveryDate"]) <= at
            if event_type == "click":
                assert values["ClickUrl"].startswith("https://example.com/")
                assert values["ClickDate"] == values["EventTriggeredDate"]
            else:
                assert values["ClickUrl"] == values["ClickDate"] == ""
            out.rows.append(values)
            out.facts.append((values["Urn"], event_type, at, values["ClickUrl"]))
    return out


def api_facts(bounces: list[dict[str, Any]], unsubscribes: list[dict[str, Any]]) -> list[Fact]:
    facts: list[Fact] = []
    for item in bounces:
        event_type = {"hardbounce": "bounce_hard", "softbounce": "bounce_soft"}[item["category"]]
        facts.append((item["recipientId"], event_type, rest_seconds(item["created"]), ""))
    facts += [(i["recipientId"], "unsubscribe", rest_seconds(i["created"]), "") for i in unsubscribes]
    return facts


def hook_fact(item: dict[str, Any]) -> Fact:
    if item["type"] == "bounce":
        event_type = {"hardbounce": "bounce_hard", "softbounce": "bounce_soft"}[item["category"]]
    else:
        event_type = HOOK_TYPES[item["type"]]
    return item["recipientId"], event_type, rest_seconds(item["created"]), item.get("url", "")


def by_type(facts: Iterable[Fact]) -> dict[str, int]:
    counts = dict.fromkeys(EVENT_TYPES, 0)
    for fact in facts:
        counts[fact[1]] += 1
    return counts


@dataclass
class Hooks(WebhookReceiver):
    """A webhook target: checks the Basic authentication and keeps the calls it acknowledged.

    ``fail_first`` answers the very first call 503 (the sandbox retries it 1 s later), ``busy``
    every call while it is set; calls of the ``refuse`` types get 422, which is not retried.
    """

    refuse: frozenset[str] = frozenset()
    fail_first: bool = False
    busy: bool = False
    attempts: int = 0
    refused: int = 0
    acked: list[list[dict[str, Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.answer = self._answer

    def _answer(self, call: WebhookCall) -> web.Response:
        if call.headers.get("Authorization") != basic("espbridge", HOOK_SECRET)["Authorization"]:
            return web.json_response({"error": "unauthorized"}, status=401)
        assert call.headers["Content-Type"].startswith("application/json")
        assert call.path == "/webhooks/demo"
        items = orjson.loads(call.body)
        assert isinstance(items, list)
        assert items
        if self.busy:
            return web.json_response({"error": "busy"}, status=503)
        self.attempts += 1
        if self.fail_first and self.attempts == 1:
            return web.json_response({"error": "busy"}, status=503)
        if {i["type"] for i in items} & self.refuse:
            self.refused += 1
            return web.json_response({"error": "refused"}, status=422)
        self.acked.append(items)
        return web.json_response({"accepted": len(items), "rejected": 0})

    def items(self) -> list[dict[str, Any]]:
        return [item for call in self.acked for item in call]


async def start_job(client: Client, job: str, count: int, chunk_size: int = 40) -> dict[str, Any]:
    """Create a batch for ``job``, stage ``count`` recipients in chunks and start it."""
    status, batch, _ = await client.create_batch(job)
    assert status == 201, batch
    for n, start in enumerate(range(0, count, chunk_size), 1):
        keys = range(start, min(start + chunk_size, count))
        assert (await client.put(batch["id"], f"c{n:06d}", people(keys, job)))["count"] == len(keys)
    assert await client.ok("POST", f"sending/batches/{batch['id']}", 202) is None
    body: dict[str, Any] = batch
    return body


@dataclass
class Gathered:
    files: FileRows
    api: list[Fact]
    hooks: list[Fact]
    bad_hook_items: int


async def gather(client: Client, esp: SandboxClient, hooks: Hooks | None, job: str, mailing: int) -> Gathered:
    """Every source's events of a completed send, as the connector would read them."""
    manifest = esp.manifest(job)
    assert manifest is not None
    on_disk = sorted(p.name for p in (esp.account_dir() / "responses").iterdir())
    assert sorted(manifest["files"]) == [f"responses/{n}" for n in on_disk]
    files = read_files(esp, manifest["files"], job)
    bounces = []
    for category in ("hardbounce", "softbounce"):
        query = {"category": category, "mailingId": str(mailing), "limit": "10000"}
        elements = (await client.ok("GET", "responses", params=query))["elements"]
        assert len(elements) < 10000, "one page holds them all"
        created = [datetime.fromisoformat(e["created"]) for e in elements]
        assert created == sorted(created), "bounces not in ascending created order"
        assert all(e["category"] == category and e["mailingId"] == mailing for e in elements)
        bounces += elements
    unsubscribes = await client.collect("unsubscribes", 5, sort="created", direction="DESC")
    created = [datetime.fromisoformat(e["created"]) for e in unsubscribes]
    assert created == sorted(created, reverse=True), "unsubscribes not newest first"
    mine = [u for u in unsubscribes if u["mailingId"] == mailing]
    hook_items = hooks.items() if hooks is not None else []
    good = [i for i in hook_items if "recipientId" in i]
    for item in good:
        assert item["data"]["BroadcastId"] == job
        assert item["data"]["CommunicationKey"] == item["recipientId"]
        assert item["mailingId"] == mailing
    return Gathered(
        files, api_facts(bounces, mine), [hook_fact(i) for i in good], len(hook_items) - len(good)
    )


# Tests


contract = contract_calls()
"""The answers of each test's clients, checked against the document at its end."""


async def test_basic_auth_client_ids_and_webhook_registration(
    sandbox: Sandboxes, contract: ContractCalls, tmp_path: Path
) -> None:
    settings = {"accounts": "demo,other", "opt_client_ids": "demo=1000001,other=1000002"}
    with sandbox(FLAVOR, **settings) as esp:
        http = esp.http
        bad_auth: list[dict[str, str]] = [
            {},
            basic(USER, "wrong"),
            basic("someone@example.com", esp.token),
            {"Authorization": f"Bearer {esp.token}"},
            {"Authorization": "Basic not-base64!"},
            {"Authorization": "Basic " + base64.b64encode(USER.encode()).decode()},
        ]
        for headers in bad_auth:
            for method, path in [("GET", "sending/batches"), ("GET", "_sandbox/stats"), ("PUT", "nope")]:
                async with http.request(method, f"{esp.url}/rest/1000001/{path}", headers=headers) as resp:
                    assert resp.status == 401, (headers, path)
                    assert resp.headers["WWW-Authenticate"] == 'Basic realm="Optimizely Campaign"'
                    assert await resp.json() == {"status": 401, "message": "Unauthorized"}
        # The account name is no client id once mapped; an unknown client id is 403.
        for client_id in ("demo", "1000003"):
            status, body, _ = await Client(esp, contract, client_id).call("GET", "sending/batches")
            assert status == 403
            assert body["status"] == 403
            assert set(body) == {"status", "message"}
        demo, other = Client(esp, contract, "1000001"), Client(esp, contract, "1000002")
        page = await demo.ok("GET", "sending/batches")
        assert (page["elements"], page["count"], page["offset"], page["limit"]) == ([], 0, 0, 100)
        assert await other.stats() == {
            "sends_created": {},
            "sends_cancelled": {},
            "batches_created": {},
            "rate_limited": 0,
        }
        status, body, _ = await demo.call("GET", "no/such/thing")
        assert (status, body["status"]) == (404, 404)

        # Webhook registration: created, then activated; per client.
        auth = orjson.dumps({"type": "keyAuth", "key": "Authorization", "passphrase": "Bearer s"}).decode()
        form = {"type": "open", "format": "json", "targetUrl": "https://gatherer/webhooks/x/demo"}
        created = await demo.ok("POST", "webhooks", 201, data={**form, "authentication": auth})
        assert {k: created[k] for k in ("type", "format", "targetUrl", "status")} == {
            "type": "open",
            "format": "json",
            "targetUrl": "https://gatherer/webhooks/x/demo",
            "status": "created",
        }
        for bad in ({"type": "opens"}, {"format": "xml"}, {"targetUrl": "gatherer"}, {"authentication": "{"}):
            status, body, _ = await demo.call("POST", "webhooks", data={**form, **bad})
            assert (status, body["status"]) == (400, 400), bad
        activated = await demo.ok("POST", f"webhooks/{created['id']}/activate")
        assert activated == {**created, "status": "activated"}
        assert await demo.ok("GET", "webhooks") == [activated]
        assert await other.ok("GET", "webhooks") == []
        status, _, _ = await demo.call("POST", "webhooks/999/activate")
        assert status == 404


async def test_batch_sending_and_every_response_source(sandbox: Sandboxes, contract: ContractCalls) -> None:
    async with Hooks(refuse=frozenset({"open"}), fail_first=True) as hooks:
        settings = {
            **BUSY_RATES,
            "rows_per_file": "40",
            "import_delay_s": "0.3",
            "phase_delay_s": "0.1",
            "opt_webhook_url": hooks.url,
            "opt_webhook_auth": HOOK_AUTH,
            "opt_webhook_batch": "10",
            "opt_duplicate_rate": "0.2",
            "opt_malformed_every": "3",
        }
        with sandbox(FLAVOR, **settings) as esp:
            client, http = Client(esp, contract), esp.http
            # Batch creation: multipart only, the fields checked.
            async with http.post(
                f"{client.base}/sending/batches",
                data={"campaign": "7000", "campaignAction": "copy", "tag": "job-1"},
                headers=client.headers,
            ) as resp:
                assert resp.status == 415
                assert (await resp.json())["status"] == 415
            for master, action, tag in [
                ("7000", "copy", ""),
                ("abc", "copy", "job-1"),
                ("7000", "move", "job-1"),
                ("7000", "copy", "job.1"),
                ("7000", "copy", "_2Ejob"),
            ]:
                status, body, _ = await client.create_batch(tag, master, action)
                assert (status, body["status"]) == (400, 400), (master, action, tag)
            status, batch, _ = await client.create_batch("job-1")
            assert status == 201
            assert batch == {
                "id": 5001,
                "campaignId": 7001,
                "recipientListId": 3001,
                "tag": "job-1",
                "chunks": [],
                "state": "initiated",
            }
            # A master used as is, and a tag that decodes to a job id with a dot.
            status, used, _ = await client.create_batch("job_2E2", "9000", "use")
            assert status == 201
            assert (used["id"], used["campaignId"]) == (5002, 9000)
            status, body, _ = await client.create_batch("job-3", "7001")
            assert status == 400, "a copy is no master campaign"

            assert await client.ok("GET", "sending/batches/5001") == batch
            for missing in ("5999", "abc"):
                assert (await client.call("GET", f"sending/batches/{missing}"))[0] == 404
            assert (await client.call("POST", "sending/batches/5001"))[0] == 409, "no chunks yet"
            assert (await client.call("PUT", "sending/batches/5001"))[0] == 400, "no body"
            status, _, _ = await client.call(
                "PUT", "sending/batches/5001", json={"chunk": "c 1", "recipients": []}
            )
            assert status == 400

            # Chunks in any order; pre-validation counts; a re-PUT replaces its chunk.
            second = [*people(range(60, 120), "job-1"), person(5, "job-1")]
            assert await client.put(5001, "c000002", second) == {"chunk": "c000002", "count": 61}
            first = [
                *people(range(60), "job-1"),
                {"id": "", "data": {"email": "x@example.com"}},
                {"id": "B1", "data": {"email": "no-at-sign"}},
                {"id": "B2", "data": {"email": "@example.com"}},
                {"id": "B3", "data": {"email": "b3@"}},
                {"id": "B4"},
                person(3, "job-1"),
                "not an object",
            ]
            assert await client.put(5001, "c000001", first) == {"chunk": "c000001", "count": 60}
            assert await client.put(5001, "c000002", second) == {"chunk": "c000002", "count": 61}
            got = await client.ok("GET", "sending/batches/5001")
            assert (got["state"], got["chunks"]) == ("has_recipients", ["c000001", "c000002"])
            campaign = await client.ok("GET", "smartcampaigns/7001")
            assert campaign["status"] == "activationRequired"
            assert (await client.call("POST", "smartcampaigns/7001/stop"))[0] == 409, "not started: no cancel"
            mailing = campaign["messages"][0]["mailingId"]
            assert mailing == 8001

            # The send: 202 once, then 409; the batch takes no more chunks.
            assert await client.ok("POST", "sending/batches/5001", 202) is None
            assert (await client.call("POST", "sending/batches/5001"))[0] == 409
            assert (await client.call("PUT", "sending/batches/5001", json={"chunk": "c3"}))[0] == 409
            assert (await client.ok("GET", "sending/batches/5001"))["state"] == "sent"

            statuses: list[str] = []

            async def finished() -> dict[str, Any] | None:
                body: dict[str, Any] = await client.ok("GET", "smartcampaigns/7001")
                if not statuses or statuses[-1] != body["status"]:
                    statuses.append(body["status"])
                return body if body["status"] == "finished" else None

            campaign = await wait_for(finished, 15, 0.02, what="the campaign to finish")
            assert statuses == ["activated", "running", "finished"]
            assert REST_TIME_RE.fullmatch(campaign["started"])
            assert REST_TIME_RE.fullmatch(campaign["finished"])
            report = await client.ok("GET", "smartcampaigns/7001/report")
            assert report["recipients"]["total"] == 120
            assert (await client.call("POST", "smartcampaigns/7001/stop"))[0] == 409, "finished: too late"
            assert (await client.call("GET", "smartcampaigns/7999"))[0] == 404

            manifest = await esp.complete_manifest("job-1")
            found = await gather(client, esp, hooks, "job-1", mailing)

            # Paging rules.
            for path in ("sending/batches", "recipients/3001", "unsubscribes", "webhooks"):
                status, body, _ = await client.call("GET", path, params={"limit": "10000"})
                assert (status, body["status"]) == (400, 400), path
                assert (await client.call("GET", path, params={"limit": "9999"}))[0] == 200
            listed = await client.collect("sending/batches", 1)
            assert [b["id"] for b in listed] == [5001, 5002]
            assert await client.stats() == {
                "sends_created": {"job-1": 1},
                "sends_cancelled": {},
                "batches_created": {"job-1": 1, "job.2": 1},
                "rate_limited": 0,
            }

    assert (manifest["broadcast_id"], manifest["batch_id"]) == ("job-1", 5001)
    assert (manifest["campaign_id"], manifest["mailing_id"], manifest["recipients"]) == (7001, 8001, 120)
    names = [FILE_NAME_RE.fullmatch(Path(f).name) for f in manifest["files"]]
    assert [(m[1], int(m[2])) if m else None for m in names] == [
        ("5001", n) for n in range(1, len(names) + 1)
    ]

    # Each source delivered what the manifest says it did; counts are the distinct events.
    files, api, hook_facts = found.files.facts, found.api, found.hooks
    assert len(set(files)) == len(files)
    assert len(set(api)) == len(api)
    assert len(set(hook_facts)) == len(hook_facts)
    assert manifest["by_source"] == {
        "file": by_type(files),
        "api": by_type(api),
        "webhook": by_type(hook_facts),
    }
    distinct = set(files) | set(api) | set(hook_facts)
    assert manifest["counts"] == by_type(distinct)
    assert manifest["duplicates"] == len(files) + len(api) + len(hook_facts) - len(distinct) > 0
    assert manifest["counts"]["sent"] == 120
    assert manifest["counts"]["delivered"] == 0
    assert all(manifest["counts"][t] > 0 for t in EVENT_TYPES if t != "delivered"), manifest["counts"]
    assert manifest["by_source"]["webhook"]["open"] == 0, "open calls were refused"
    assert manifest["undelivered"] > 0
    assert hooks.refused > 0
    assert hooks.attempts == len(hooks.acked) + hooks.refused + 1, "the first call was retried"
    # Malformed rows: one in every third file, one item in every third webhook call.
    assert found.bad_hook_items > 0
    assert len(found.files.bad) == len(manifest["files"]) // 3
    assert manifest["malformed_rows"] == len(found.files.bad) + found.bad_hook_items
    kinds = [
        "field count"
        if len(row) != len(HEADER)
        else row[3]
        if row[3] not in ("Send", "Open", "Click", "Bounce", "Unsubscription")
        else "date-or-type"
        for row in found.files.bad
    ]
    assert kinds[:3] == ["Forward", "date-or-type", "field count"]
    # The URL with a ";" came through the quoting.
    assert any(";" in row["ClickUrl"] for row in found.files.rows)


async def test_bounces_are_asked_for_by_mailing_and_recipients_as_documented(
    sandbox: Sandboxes, contract: ContractCalls
) -> None:
    settings = {**BUSY_RATES, "import_delay_s": "0.1", "phase_delay_s": "0.05", "opt_source_weights": "api=1"}
    with sandbox(FLAVOR, **settings) as esp:
        client = Client(esp, contract)
        status, batch, _ = await client.create_batch("job-p")
        assert status == 201
        listed_at = f"recipients/{batch['recipientListId']}"
        assert (await client.ok("GET", listed_at))["elements"] == [], "imported only when the batch starts"
        for n, start in enumerate((0, 30), 1):
            await client.put(batch["id"], f"c{n:06d}", people(range(start, start + 30), "job-p"))
        assert await client.ok("POST", f"sending/batches/{batch['id']}", 202) is None
        manifest = await esp.complete_manifest("job-p")
        mailing = manifest["mailing_id"]

        # The batch's list: its recipients by id, paged by offset and limit, in either direction.
        listed = await client.collect(listed_at, 7)
        ids = [r["id"] for r in listed]
        assert ids == sorted(f"K{i}" for i in range(60))
        assert all(REST_TIME_RE.fullmatch(r["created"]) for r in listed)
        newest = await client.ok("GET", listed_at, params={"direction": "DESC", "limit": "3"})
        assert [r["id"] for r in newest["elements"]] == ids[::-1][:3]
        for bad in ({"sort": "email"}, {"attributeNames": "email"}, {"limit": "0"}):
            assert (await client.call("GET", listed_at, params=bad))[0] == 400, bad
        assert (await client.call("GET", "recipients/3999"))[0] == 404

        # /responses: a mailing's first `limit` (100 unless given) in ascending created.
        by_mailing = {"category": "hardbounce", "mailingId": str(mailing)}
        every = (await client.ok("GET", "responses", params={**by_mailing, "limit": "10000"}))["elements"]
        assert len(every) == manifest["counts"]["bounce_hard"] > 2
        first = await client.ok("GET", "responses", params={**by_mailing, "limit": "2"})
        assert (first["elements"], first["count"], first["limit"]) == (every[:2], 2, 2)
        assert (await client.ok("GET", "responses", params=by_mailing))["limit"] == 100
        # Narrowed by recipientIds (comma-separated), with the mailing or without.
        wanted = {every[0]["recipientId"], every[-1]["recipientId"]}
        for params in (
            {**by_mailing, "recipientIds": ",".join([*sorted(wanted), "nobody"])},
            {"category": "hardbounce", "recipientIds": ",".join(sorted(wanted))},
        ):
            narrowed = await client.ok("GET", "responses", params=params)
            assert {e["recipientId"] for e in narrowed["elements"]} == wanted, params
        assert (await client.call("GET", "responses", params={**by_mailing, "recipientIds": "x,y"}))[0] == 404
        assert (await client.call("GET", "responses", params={**by_mailing, "mailingId": "8999"}))[0] == 404
        autoresponses = await client.ok(
            "GET", "responses", params={**by_mailing, "category": "autoresponder"}
        )
        assert autoresponses["elements"] == []
        # Refused: an offset (no such parameter), a limit over 10000, neither mailing nor recipients.
        for params, says in [
            ({**by_mailing, "offset": "0"}, "offset"),
            ({**by_mailing, "limit": "10001"}, "limit"),
            ({"category": "hardbounce"}, "mailingId or recipientIds"),
            ({**by_mailing, "category": "bounce"}, "category"),
        ]:
            status, body, _ = await client.call("GET", "responses", params=params)
            assert (status, body["status"]) == (400, 400), params
            assert says in body["message"], body


async def test_over_the_limits_answers_429(sandbox: Sandboxes, contract: ContractCalls) -> None:
    settings = {"opt_max_concurrent": "2", "opt_rate_per_s": "20"}
    with sandbox(FLAVOR, **settings) as esp:
        client = Client(esp, contract)
        status, batch, _ = await client.create_batch("job-l")
        assert status == 201
        # Two PUTs whose bodies are held back stay in flight; one more request is refused.
        release = asyncio.Event()

        def held_put(chunk: str) -> asyncio.Task[tuple[int, Any, dict[str, str]]]:
            async def body() -> AsyncIterator[bytes]:
                yield b'{"chunk": "' + chunk.encode() + b'", '
                await release.wait()
                yield orjson.dumps({"recipients": people(range(3), "job-l")})[1:]

            return asyncio.create_task(client.call("PUT", f"sending/batches/{batch['id']}", data=body()))

        puts = [held_put("c000001"), held_put("c000002")]

        async def refused() -> tuple[Any, dict[str, str]] | None:
            # Until both are in flight, the bucket may refuse too (it is checked after the count).
            status, body, headers = await client.call("GET", "sending/batches")
            return (body, headers) if status == 429 and "same time" in body["message"] else None

        try:
            body, headers = await wait_for(refused, 5, 0.02, what="a 429 while two requests are in flight")
        finally:
            release.set()
        assert body == {"status": 429, "message": "Too many requests are used at the same time"}
        assert headers["Retry-After"] == "1"
        for put in puts:
            status, answer, _ = await put
            assert (status, answer["count"]) == (200, 3)

        # The token bucket: 20 a second; a burst is refused with Retry-After, and passes later.
        answers = [await client.call("GET", "sending/batches") for _ in range(40)]
        limited = [(body, headers) for status, body, headers in answers if status == 429]
        assert limited, [a[0] for a in answers]
        assert all(s in (200, 429) for s, _, _ in answers)
        for body, headers in limited:
            assert body["status"] == 429
            assert int(headers["Retry-After"]) >= 1

        async def passes() -> bool | None:
            return True if (await client.call("GET", "sending/batches"))[0] == 200 else None

        await wait_for(passes, 5, 0.02, what="the bucket to refill")
        # Test support is not limited.
        assert all([(await client.call("GET", "_sandbox/stats"))[0] == 200 for _ in range(10)])


async def test_injected_503s_come_before_any_side_effect(sandbox: Sandboxes, contract: ContractCalls) -> None:
    with sandbox(FLAVOR, opt_error_rate="0.4") as esp:
        client = Client(esp, contract)
        created: set[str] = set()
        unavailable = 0
        for n in range(30):
            status, body, headers = await client.create_batch(f"job-{n}")
            if status == 201:
                created.add(f"job-{n}")
                continue
            assert status == 503, body
            assert body["status"] == 503
            assert headers["Retry-After"] == "1"
            unavailable += 1
        assert 0 < unavailable < 30
        stats = await client.stats()
        assert stats["batches_created"] == dict.fromkeys(created, 1)


async def test_a_restart_resumes_the_send_without_sending_twice(
    sandbox: Sandboxes, contract: ContractCalls, tmp_path: Path
) -> None:
    settings = {
        **BUSY_RATES,
        "seed": "7",
        "rows_per_file": "15",
        "opt_malformed_every": "4",
        "opt_webhook_batch": "5",
    }
    token = "restart-token"
    compared = ("counts", "by_source", "duplicates", "undelivered", "malformed_rows", "recipients")

    # The reference: the same job and recipients, uninterrupted, on another root.
    async with Hooks() as hooks:
        with sandbox(
            FLAVOR,
            root=tmp_path / "ref" / "sftp",
            token=token,
            **settings,
            opt_webhook_url=hooks.url,
            opt_webhook_auth=HOOK_AUTH,
        ) as ref:
            await start_job(Client(ref, contract), "job-r", 60)
            expected = await ref.complete_manifest("job-r")

    async with Hooks() as hooks:
        hook_settings = {**settings, "opt_webhook_url": hooks.url, "opt_webhook_auth": HOOK_AUTH}
        root = tmp_path / "run" / "sftp"
        with sandbox(FLAVOR, root=root, token=token, **hook_settings, phase_delay_s="1.5") as first:
            client = Client(first, contract)
            batch = await start_job(client, "job-r", 60)

            async def first_file() -> list[Path] | None:
                found = list((first.account_dir() / "responses").glob("Response_*.csv"))
                return found or None

            await wait_for(first_file, 15, 0.02, what="the first response file")
            assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        interrupted = first.manifest("job-r")
        assert interrupted is not None
        assert not interrupted["complete"], "the send finished before the kill; nothing was resumed"
        # Complete response files only: a hidden temporary one is the killed run's unfinished write.
        before = {
            p.name: p.read_bytes()
            for p in (root / "optimizely" / "demo" / "responses").iterdir()
            if not p.name.startswith(".")
        }

        with sandbox(FLAVOR, root=root, token=token, **hook_settings) as second:
            client = Client(second, contract)
            assert (await client.call("POST", f"sending/batches/{batch['id']}"))[0] == 409
            manifest = await second.complete_manifest("job-r")
            found = await gather(client, second, hooks, "job-r", 8001)
            assert await client.stats() == {
                "sends_created": {"job-r": 1},
                "sends_cancelled": {},
                "batches_created": {"job-r": 1},
                "rate_limited": 0,
            }
            assert (await client.ok("GET", "smartcampaigns/7001"))["status"] == "finished"

    responses = root / "optimizely" / "demo" / "responses"
    assert {n: (responses / n).read_bytes() for n in before} == before, "a written file changed"
    assert {k: manifest[k] for k in compared} == {k: expected[k] for k in compared}
    assert len(manifest["files"]) == len(set(manifest["files"])) == len(expected["files"])
    files, api, hook_facts = found.files.facts, found.api, found.hooks
    assert len(files) == len(set(files)), "a file row was written twice"
    assert manifest["by_source"] == {
        "file": by_type(files),
        "api": by_type(api),
        "webhook": by_type(set(hook_facts)),
    }
    assert manifest["counts"] == by_type(set(files) | set(api) | set(hook_facts))
    assert manifest["counts"]["sent"] == 60


async def control(esp: SandboxClient, email: str, action: str, list_id: str = "4001") -> dict[str, Any]:
    """A change made on the ESP side, through the sandbox's control route; the record."""
    url = f"{esp.api()}/_sandbox/contacts"
    body = {"email": email, "list": list_id, "action": action}
    async with esp.http.post(url, json=body, headers=esp.headers) as resp:
        assert resp.status == 200, await resp.text()
        record: dict[str, Any] = await resp.json()
        return record


async def test_recipient_lists_and_the_unsubscribe_list_answer_as_documented(
    sandbox: Sandboxes, contract: ContractCalls
) -> None:
    async with Hooks() as hooks:
        settings = {"opt_webhook_url": hooks.url, "opt_webhook_auth": HOOK_AUTH}
        with sandbox(FLAVOR, **settings) as esp:
            client = Client(esp, contract)
            # The bulk add: an unknown opt-in process is 409; no address and a repeat fail.
            anna = {"id": "anna@example.com", "data": {"firstname": "Anna", "age": 41}}
            added = {"recipients": [anna, {"id": "no-address"}, anna]}
            assert (await client.call("PUT", "recipients/4001", json={**added, "optinProcessId": 999}))[
                0
            ] == 409
            assert await client.ok("PUT", "recipients/4001", json=added) == {
                "count": 1,
                "failedIds": ["no-address", "anna@example.com"],
            }
            assert (await client.call("PUT", "recipients/9999", json=added))[0] == 404

            # One add through the double opt-in process: 202, pending, not listed until confirmed.
            form = {"recipientId": "cleo@example.com", "optinProcessId": "102", "returnOptInMailId": "true"}
            cleo = await client.ok("POST", "recipients/4001", 202, data={**form, "data.firstname": "Cleo"})
            assert (cleo["id"], cleo["optInMailId"].startswith("optin-")) == ("cleo@example.com", True)
            nameless = {k: v for k, v in form.items() if k != "recipientId"}
            for bad in (nameless, {**form, "optinProcessId": "555"}, {**form, "address": "cleo"}):
                assert (await client.call("POST", "recipients/4001", data=bad))[0] == 400, bad
            assert (await client.call("POST", "recipients/4001", data=form))[0] == 409, "on the list already"
            listed = await client.ok("GET", "recipients/4001")
            assert [r["id"] for r in listed["elements"]] == ["anna@example.com"]

            # Changes made on the ESP side come as webhook calls; a removal there is not reported.
            await control(esp, "cleo@example.com", "confirm")
            await control(esp, "dora@example.com", "subscribe", "4002")
            await control(esp, "anna@example.com", "bounce_hard")
            await control(esp, "dora@example.com", "remove", "4002")
            await wait_for(lambda: len(hooks.acked) >= 3, 10, 0.05, what="three webhook calls")
            confirmed, signed_up, bounced = hooks.items()
            assert {k: confirmed[k] for k in ("type", "clientId", "recipientListId", "recipientId")} == {
                "type": "doubleoptin",
                "clientId": "demo",
                "recipientListId": 4001,
                "recipientId": "cleo@example.com",
            }
            assert confirmed["data"] == {"firstname": "Cleo", "email": "cleo@example.com"}
            assert REST_TIME_RE.fullmatch(confirmed["created"])
            assert (signed_up["type"], signed_up["recipientListId"]) == ("singleoptin", 4002)
            assert (bounced["type"], bounced["category"]) == ("bounce", "hardbounce")

            # Attribute updates: set, append; an id not on the list fails.
            modified = {
                "updateMode": "append",
                "recipients": [{"id": "cleo@example.com", "data": {"firstname": "!"}}],
            }
            assert await client.ok("PUT", "recipients/4001/modify", json=modified) == {
                "count": 1,
                "failedIds": [],
            }
            missing = {"recipients": [{"id": "zoe@example.com", "data": {"firstname": "Zoe"}}]}
            assert await client.ok("PUT", "recipients/4001/modify", json=missing) == {
                "count": 0,
                "failedIds": ["zoe@example.com"],
            }

            # The client's unsubscribe list: once per address, for every list.
            many = ",".join(f"p{n}@example.com" for n in range(5001))
            for body in (
                {"recipientIds": many},
                {"recipientIds": "cleo@example.com", "recipientListId": "4001"},
            ):
                assert (await client.call("POST", "unsubscribes", data=body))[0] == 400
            unsubscribed = await client.ok(
                "POST", "unsubscribes", data={"recipientIds": "cleo@example.com,x"}
            )
            assert unsubscribed == {"successfulIds": ["cleo@example.com"], "unsuccessfulIds": ["x"]}
            assert (await client.call("POST", "unsubscribes", data={"recipientIds": "cleo@example.com"}))[
                0
            ] == 400
            entries = await client.ok("GET", "unsubscribes", params={"recipientIds": "cleo@example.com"})
            assert [(e["recipientId"], "recipientListId" in e) for e in entries["elements"]] == [
                ("cleo@example.com", False)
            ]
            validity = {"recipientId": "cleo@example.com", "recipientListIds": "4001,4002,9999"}
            assert await client.ok("GET", "recipients", params=validity) == [
                {"recipientListId": 4001, "valid": False, "validationFailedReason": "unsubscribed"},
                {"recipientListId": 4002, "valid": False, "validationFailedReason": "unsubscribed"},
            ], "the client's unsubscribe list holds for every list"
            assert (
                await client.ok("DELETE", "unsubscribes", 204, params={"recipientIds": "cleo@example.com"})
                is None
            )
            assert (await client.call("DELETE", "unsubscribes", params={"recipientIds": "cleo@example.com"}))[
                0
            ] == 404
            assert (await client.ok("GET", "recipients", params=validity))[0]["valid"] is True

            # The blocklist keeps an address off every list.
            assert (await client.ok("POST", "blacklistentries", 201, data={"entry": "*@blocked.example"}))[
                "pattern"
            ] == "*@blocked.example"
            blocked = {"recipients": [{"id": "eve@blocked.example"}]}
            assert (await client.ok("PUT", "recipients/4002", json=blocked))["failedIds"] == [
                "eve@blocked.example"
            ]

            # Deletion: by ids, or (as documented) every recipient when neither ids nor a type is named.
            both = {"recipientIds": "cleo@example.com", "removalType": "unsubscribed"}
            assert (await client.call("DELETE", "recipients/4001", params=both))[0] == 400
            await client.ok("DELETE", "recipients/4001", 204, params={"recipientIds": "cleo@example.com"})
            assert (await client.ok("GET", "recipients/4001"))["elements"] != []
            await client.ok("DELETE", "recipients/4001", 204)
            assert (await client.ok("GET", "recipients/4001"))["elements"] == []
    assert len(hooks.acked) == 3, "the removal was not reported"


async def test_a_change_not_yet_reported_when_the_sandbox_was_killed_is_reported_after_the_restart(
    sandbox: Sandboxes, tmp_path: Path
) -> None:
    async with Hooks(busy=True) as hooks:  # the sandbox retries 1, 2, 4… s later
        settings = {"opt_webhook_url": hooks.url, "opt_webhook_auth": HOOK_AUTH, "token": "restart-token"}
        root = tmp_path / "sftp"
        with sandbox(FLAVOR, root=root, **settings) as first:
            await control(first, "anna@example.com", "unsubscribe_link")
            await wait_for(lambda: hooks.calls, 10, 0.02, what="the first, refused, webhook call")
            assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        hooks.busy = False
        with sandbox(FLAVOR, root=root, **settings):
            await wait_for(lambda: hooks.acked, 15, 0.05, what="the change reported after the restart")
    (item,) = hooks.items()
    assert (item["type"], item["recipientId"], item["recipientListId"]) == (
        "unsubscribe",
        "anna@example.com",
        4001,
    )
    assert len(hooks.acked) == 1
