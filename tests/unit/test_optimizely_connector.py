"""The optimizely connector against a tiny fake of the documented Optimizely Campaign endpoints.

The fake (on loopback, in this file) speaks only what docs/connectors/optimizely.md says, and only
as much of it as these tests need; the sandbox's optimizely flavor is tested elsewhere. The list
file is served by an in-memory stand-in for the SFTP pool, so no SFTP server is needed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self, cast

import orjson
import pytest
from aiohttp import web
from pydantic import SecretStr

from shared.esp import AccountConfig, BadRow, ConnectorContext, ImportState, SendState, SentBroadcast
from shared.esp.base import CancelOutcome, WebhookAuthError
from shared.esp.generic import ListRejectedError
from shared.esp.optimizely import (
    Chunk,
    OptimizelyConnector,
    SendAtNotSupportedError,
    decode_tag,
    encode_tag,
    list_chunks,
)
from shared.esp.registry import CONNECTORS
from shared.esp.rest import EspAuthError, EspUnavailableError
from shared.infra.sftp import SftpPool
from shared.model.errors import ConfigurationError, PermanentError
from shared.model.messages import EventType, ResponseEvent, SendMode
from tests.fixtures.contract import checked_fake
from tests.fixtures.fake_esp import OFFLINE, FakeEsp, pulled
from tests.unit.test_messages import job

CLIENT = "1000001"
USER = "api-user@example.com"
PASSWORD = "pa:ss wörd"
SECRET = "hook-s3cret"
LIST_PATH = "optimizely/demo/drop/job-1.csv"
LIST = (
    "email;firstname;CommunicationKey\n"
    "anna@example.com;Anna;K1\n"
    "bad-address;Bert;K2\n"
    'carl@example.com;"Carl; ""CJ""";K3\n'
    "dora@example.com;;K4\n"
)


# --- the fake ESP ---------------------------------------------------------------------------------------


@dataclass
class FakeOptimizely(FakeEsp):
    """Sending batches, campaigns, bounces and unsubscribes as the documentation describes them."""

    base: str = "/rest"
    batches: dict[int, dict[str, Any]] = field(default_factory=dict)
    chunks: dict[int, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    campaigns: dict[int, dict[str, Any]] = field(default_factory=dict)
    bounces: list[dict[str, Any]] = field(default_factory=list)
    unsubscribes: list[dict[str, Any]] = field(default_factory=list)
    recipients: dict[int, list[str]] = field(default_factory=dict)  # list id → recipient ids, id order
    created: int = 0
    faults: list[tuple[int, dict[str, str]]] = field(default_factory=list)  # next answers, in order
    gate: asyncio.Event | None = None  # GET /sending/batches/{id} waits for it when set
    in_flight: int = 0
    max_in_flight: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    moved_on: str | None = None  # a stop finds the campaign moved on to this status: 409

    def batch(self, tag: str, state: str = "initiated", campaign: int | None = None) -> dict[str, Any]:
        batch_id = 5001 + len(self.batches)
        campaign = campaign or 7001 + len(self.batches)
        self.batches[batch_id] = {
            "id": batch_id,
            "campaignId": campaign,
            "recipientListId": 3001,
            "tag": tag,
            "chunks": [],
            "state": state,
        }
        self.chunks[batch_id] = {}
        self.campaigns.setdefault(
            campaign, {"id": campaign, "status": "activated", "messages": [{"mailingId": 8004}], "total": 0}
        )
        return self.batches[batch_id]

    def application(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/rest/{client}/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        """Checks the credentials and the client, answers a planned fault, then the routes."""
        tail = request.match_info["tail"]
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.json_response(
                {"status": 401, "message": "Unauthorized"},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="Optimizely Campaign"'},
            )
        if request.match_info["client"] != CLIENT:
            return error(403, "Forbidden")
        if self.faults:
            status, headers = self.faults.pop(0)
            return error(status, "Too many requests are used at the same time", headers)
        return await self.route(request, tail)

    async def route(self, request: web.Request, tail: str) -> web.Response:
        method, parts, query = request.method, tail.split("/"), dict(request.query)
        if tail == "sending/batches" and method == "POST":
            if not request.content_type.startswith("multipart/form-data"):
                return error(415, "multipart/form-data expected")
            form = {k: str(v) for k, v in (await request.post()).items()}
            if not form.get("campaign", "").isdigit() or form.get("campaignAction") not in ("use", "copy"):
                return error(400, "bad campaign")
            self.created += 1
            return web.json_response(self.batch(form["tag"]), status=201)
        if tail == "sending/batches" and method == "GET":
            return page(sorted(self.batches.values(), key=lambda b: int(b["id"])), query)
        if parts[:2] == ["sending", "batches"] and len(parts) == 3:
            batch = self.batches.get(int(parts[2]))
            if batch is None:
                return error(404, "no such batch")
            if method == "GET":
                return await self.held(batch)
            if method == "PUT":
                body = await request.json()
                if batch["state"] == "sent":
                    return error(409, "batch already sent")
                recipients = body["recipients"]
                earlier: set[str] = set()
                count = 0
                for r in recipients:
                    if passes(r, earlier):
                        count += 1
                    earlier.add(r.get("id", ""))
                self.chunks[batch["id"]][body["chunk"]] = recipients
                batch["chunks"] = sorted(self.chunks[batch["id"]])
                batch["state"] = "has_recipients"
                return web.json_response({"chunk": body["chunk"], "count": count})
            if method == "POST":
                if batch["state"] != "has_recipients":
                    return error(409, f"batch is {batch['state']}")
                batch["state"] = "sent"
                return web.Response(status=202)
        if parts[0] == "smartcampaigns":
            campaign = self.campaigns.get(int(parts[1]))
            if campaign is None:
                return error(404, "no such campaign")
            if parts[2:] == ["stop"] and method == "POST":
                return self.stop(campaign)
            if len(parts) == 3:
                return web.json_response(
                    {"campaignId": campaign["id"], "recipients": {"net": 0, "total": campaign["total"]}}
                )
            return self.shown(campaign)
        if tail == "responses":
            return self.responses(query)
        if parts[0] == "recipients" and len(parts) == 2 and method == "GET":
            listed = self.recipients.get(int(parts[1]))
            if listed is None:
                return error(404, "no such recipient list")
            return page([{"id": r, "created": "2026-11-22T09:00:00.000+01:00"} for r in listed], query)
        if tail == "unsubscribes":
            assert (query.get("sort"), query.get("direction")) == ("created", "DESC")
            return page(sorted(self.unsubscribes, key=lambda u: when(u["created"]), reverse=True), query)
        return error(404, f"no route {method} {tail}")

    def shown(self, campaign: dict[str, Any]) -> web.Response:
        """A ``RestSmartCampaign``."""
        shown = {k: v for k, v in campaign.items() if k != "total"}  # the report's, not the campaign's
        return web.json_response({"name": "c", "type": "regular", **shown})

    def stop(self, campaign: dict[str, Any]) -> web.Response:
        """``POST /smartcampaigns/{id}/stop``: 200 and ``canceled`` once started and not finished."""
        if self.moved_on is not None:
            campaign["status"] = self.moved_on
        if campaign["status"] not in ("activated", "running", "paused"):
            return error(409, "The Smart Campaign could not be cancelled. Ensure that it has started.")
        campaign["status"] = "canceled"
        return self.shown(campaign)

    def responses(self, query: dict[str, str]) -> web.Response:
        """``GET /responses`` as documented: no ``offset``; the first ``limit`` (at most 10000)."""
        unknown = set(query) - {"limit", "recipientIds", "mailingId", "category"}
        if unknown:
            return error(400, f"unknown parameters {sorted(unknown)}")
        limit = int(query.get("limit", "100"))
        ids = set(query["recipientIds"].split(",")) if "recipientIds" in query else None
        if limit > 10000 or "category" not in query or (ids is None and "mailingId" not in query):
            return error(400, "category and mailingId or recipientIds, limit up to 10000")
        rows = [
            b
            for b in self.bounces
            if b["category"] == query["category"]
            and str(b["mailingId"]) == query.get("mailingId", str(b["mailingId"]))
            and (ids is None or b["recipientId"] in ids)
        ]
        rows.sort(key=lambda b: (when(b["created"]), b["recipientId"]))
        return web.json_response(
            {"elements": rows[:limit], "count": len(rows[:limit]), "offset": 0, "limit": limit}
        )

    async def held(self, batch: dict[str, Any]) -> web.Response:
        async with self.changed:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.changed.notify_all()
        try:
            if self.gate is not None:
                await self.gate.wait()
            return web.json_response(batch)
        finally:
            async with self.changed:
                self.in_flight -= 1
                self.changed.notify_all()


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"status": status, "message": message}, status=status, headers=headers)


def passes(recipient: dict[str, Any], earlier: set[str]) -> bool:
    email = str(recipient.get("data", {}).get("email", ""))
    local, at, domain = email.partition("@")
    return bool(recipient.get("id")) and bool(local and at and domain) and recipient["id"] not in earlier


def when(created: str) -> datetime:
    return datetime.fromisoformat(created)


def page(items: list[Any], query: dict[str, str]) -> web.Response:
    offset, limit = int(query.get("offset", "0")), int(query.get("limit", "100"))
    if limit >= 10000:
        return error(400, "limit must be < 10000")
    chunk = items[offset : offset + limit]
    body = {"elements": chunk, "count": len(chunk), "offset": offset, "limit": limit}
    return web.json_response(body)


esp = checked_fake(FakeOptimizely)


# --- an in-memory SFTP pool (only what download_stream uses) -------------------------------------------


class MemoryFile:
    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def read(self, size: int) -> bytes:
        block = self._data[self._pos : self._pos + min(size, 7)]  # small reads split lines and UTF-8
        self._pos += len(block)
        return block


class MemorySftp:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.reads = 0

    def open(self, path: str, mode: str) -> MemoryFile:
        assert mode == "rb"
        self.reads += 1
        return MemoryFile(self.files[path])

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[MemorySftp]:
        yield self


def account(url: str, password: str = PASSWORD, timeout: float = 5.0, **options: Any) -> AccountConfig:
    """The account ``demo`` of client :data:`CLIENT` at ``url``."""
    return AccountConfig(
        esp="optimizely",
        account="demo",
        connector="optimizely",
        api_url=url,
        client_id=CLIENT,
        username=USER,
        password=SecretStr(password),
        token=SecretStr(SECRET),
        request_timeout_s=timeout,
        options=options,
    )


def connector(
    esp: FakeOptimizely,
    files: dict[str, bytes] | None = None,
    password: str = PASSWORD,
    timeout: float = 5.0,
    **options: Any,
) -> OptimizelyConnector:
    sftp = MemorySftp(files if files is not None else {LIST_PATH: LIST.encode()})
    made = account(esp.url, password, timeout, **options)
    return OptimizelyConnector(made, ConnectorContext(esp.http, cast(SftpPool, sftp)))


async def chunks_of(data: bytes, job_id: str = "job-1", **kwargs: Any) -> list[Chunk | BadRow]:
    async def blocks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 3):  # 3 bytes at a time: splits lines and multi-byte characters
            yield data[i : i + 3]

    return [item async for item in list_chunks(blocks(), job_id, **kwargs)]


def broadcast(send_id: str | None = "5001", requested_at: datetime | None = None) -> SentBroadcast:
    return SentBroadcast(
        job_id="job-1",
        message="7001",
        import_id="5001:3:1",
        send_id=send_id,
        requested_at=requested_at or datetime(2026, 11, 22, 9, 59, tzinfo=UTC),
    )


async def pull_round(
    c: OptimizelyConnector, b: SentBroadcast, cursor: str | None
) -> tuple[list[ResponseEvent | BadRow], str | None, int]:
    """One round of pulls: the items, the cursor to store, the pages."""
    pulls = await pulled(c, b, cursor, most=49)
    return pulls.items, pulls.cursors[-1], len(pulls.cursors)


# --- configuration --------------------------------------------------------------------------------------


async def test_registered_and_list_format(esp: FakeOptimizely) -> None:
    assert CONNECTORS["optimizely"] is OptimizelyConnector
    c = connector(esp)
    fmt = c.list_format
    assert (fmt.delimiter, fmt.encoding, fmt.line_terminator) == (";", "utf-8", "\n")
    assert (fmt.email_field, fmt.key_field) == ("email", "CommunicationKey")
    assert c.list_path(job()) == "optimizely/demo/drop/job-1.csv"
    assert [(s.folder, s.pattern) for s in c.response_sources] == [("responses", "Response*")]
    assert c.archive_folder == "archive"
    assert c.can_send
    assert c.pulls_api
    assert not connector(esp, api_pulls=False).pulls_api


async def test_credentials_are_required() -> None:
    account = AccountConfig(esp="optimizely", account="demo", connector="optimizely", api_url="http://x/rest")
    with pytest.raises(ConfigurationError, match="optimizely/demo"):
        OptimizelyConnector(account, OFFLINE)


def test_tags_encode_and_decode_the_job_id() -> None:
    assert encode_tag("job-1") == "job-1"
    assert encode_tag("a.b") == "a_2Eb"
    assert encode_tag("a_b:c.d") == "a_5Fb_3Ac_2Ed"
    for job_id in ("job-1", "a.b", "a_b:c.d", "x_2E_5F"):
        assert decode_tag(encode_tag(job_id)) == job_id
    with pytest.raises(PermanentError):
        encode_tag("." * 128)


# --- HTTP: auth, errors, limits -------------------------------------------------------------------------


async def test_every_call_carries_basic_auth_under_the_client_path(esp: FakeOptimizely) -> None:
    c = connector(esp)
    esp.batch("job-1", state="has_recipients")
    assert (await c.import_status("5001:3:1")).state is ImportState.DONE
    await c.find_send(job())
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert esp.seen
    assert all(s.authorization == expected for s in esp.seen)


async def test_refused_credentials_are_a_configuration_error(esp: FakeOptimizely) -> None:
    c = connector(esp, password="wrong")
    with pytest.raises(EspAuthError):
        await c.import_status("5001:1:0")
    assert len(esp.seen) == 1  # not retried


async def test_429_with_retry_after_is_unavailable_and_later_calls_wait_for_it(esp: FakeOptimizely) -> None:
    c = connector(esp, timeout=5.0)
    esp.batch("job-1", state="has_recipients")
    esp.faults = [(429, {"Retry-After": "120"})]
    with pytest.raises(EspUnavailableError) as info:
        await c.import_status("5001:1:0")
    assert info.value.retry_after_s == 120
    assert len(esp.seen) == 1
    with pytest.raises(EspUnavailableError) as again:  # fails fast: the ESP asked for two minutes
        await c.send_status("5001")
    assert again.value.retry_after_s is not None
    assert again.value.retry_after_s > 100
    assert len(esp.seen) == 1


async def test_429_and_5xx_within_the_budget_are_retried(esp: FakeOptimizely) -> None:
    c = connector(esp)
    esp.batch("job-1", state="has_recipients")
    esp.faults = [(429, {"Retry-After": "0"}), (503, {"Retry-After": "0"})]
    status = await c.import_status("5001:1:0")
    assert status.state is ImportState.DONE
    assert len(esp.seen) == 3


async def test_the_concurrency_cap_holds(esp: FakeOptimizely) -> None:
    c = connector(esp, max_concurrency=3, requests_per_second=1000)
    esp.batch("job-1", state="has_recipients")
    esp.gate = asyncio.Event()
    calls = [asyncio.create_task(c.import_status("5001:1:0")) for _ in range(10)]
    try:
        async with esp.changed:
            await asyncio.wait_for(esp.changed.wait_for(lambda: esp.in_flight >= 3), 5)
            with pytest.raises(TimeoutError):  # a fourth request must not arrive while three are held
                await asyncio.wait_for(esp.changed.wait_for(lambda: esp.in_flight > 3), 0.3)
    finally:
        esp.gate.set()
    results = await asyncio.gather(*calls)
    assert all(r.state is ImportState.DONE for r in results)
    assert esp.max_in_flight == 3
    assert len(esp.seen) == 10


async def test_the_rate_limit_holds(esp: FakeOptimizely) -> None:
    c = connector(esp, max_concurrency=50, requests_per_second=20)
    esp.batch("job-1", state="has_recipients")
    await asyncio.gather(*(c.import_status("5001:1:0") for _ in range(30)))
    arrivals = esp.arrivals()
    assert len(arrivals) == 30
    # at most 20 requests in any one second at the ESP: the 21st after a request comes a second later
    assert all(later - earlier >= 0.95 for earlier, later in zip(arrivals, arrivals[20:], strict=False))


# --- the list file and the import ---------------------------------------------------------------------


async def test_list_file_chunks_keep_file_order_fields_and_lines() -> None:
    data = (
        "\ufeffemail;firstname;CommunicationKey;city\r\n"
        "anna@example.com;Änne;K1;Köln\r\n"
        'b@example.com;"multi\nline; ""quoted""";K2;\r\n'
        "c@example.com;;K3;Bonn\n"
        "broken;K4\n"
        "\n"
        "e@example.com;Eve;K5;Ulm"  # no final line end
    ).encode()
    items = await chunks_of(data, "job-1", chunk_size=2)
    chunks = [i for i in items if isinstance(i, Chunk)]
    bad = [i for i in items if isinstance(i, BadRow)]
    assert [c.chunk_id for c in chunks] == ["c000001", "c000002"]
    assert [len(c.recipients) for c in chunks] == [2, 2]
    assert [(c.first_line, c.last_line) for c in chunks] == [(2, 3), (5, 8)]
    assert chunks[0].recipients[0] == {
        "id": "K1",
        "data": {
            "email": "anna@example.com",
            "firstname": "Änne",
            "CommunicationKey": "K1",
            "city": "Köln",
            "BroadcastId": "job-1",
        },
    }
    assert chunks[0].recipients[1]["data"]["firstname"] == 'multi\nline; "quoted"'
    assert "city" not in chunks[0].recipients[1]["data"]  # empty fields are left out
    assert chunks[1].recipients[0]["data"] == {
        "email": "c@example.com",
        "CommunicationKey": "K3",
        "city": "Bonn",
        "BroadcastId": "job-1",
    }
    assert chunks[1].recipients[1]["id"] == "K5"
    assert [(b.line, b.raw) for b in bad] == [(6, b"broken;K4")]
    assert "2 fields, want 4" in bad[0].error
    assert [c.chunk_id for c in (await chunks_of(data, chunk_size=1000)) if isinstance(c, Chunk)] == [
        "c000001"
    ]


async def test_list_file_custom_columns_and_a_bad_header() -> None:
    data = b"mail,id,x\na@b.c,R1,\n"
    (chunk,) = await chunks_of(
        data, "a.b", delimiter=",", email_column="mail", recipient_id_column="id", job_attribute="Job"
    )
    assert isinstance(chunk, Chunk)
    assert chunk.recipients == ({"id": "R1", "data": {"mail": "a@b.c", "id": "R1", "Job": "a.b"}},)
    from shared.esp.optimizely import ListFileError

    with pytest.raises(ListFileError, match="CommunicationKey"):
        await chunks_of(b"email;key\na@b.c;1\n")
    with pytest.raises(ListFileError, match=r"^the list file is not UTF-8 near line 2: "):
        await chunks_of(b"email;CommunicationKey\nj\xf6rg@b.c;1\n")


async def test_start_import_creates_the_batch_with_the_encoded_tag_and_finds_it_again(
    esp: FakeOptimizely,
) -> None:
    j = job(job_id="job_1.a", message="7001")
    path = "optimizely/demo/drop/job_1.a.csv"
    c = connector(esp, files={path: LIST.encode()}, chunk_size=2)
    first = await c.start_import(path, j)
    creation = [s for s in esp.seen if s.method == "POST"]
    assert len(creation) == 1
    assert creation[0].content_type == "multipart/form-data"
    (batch,) = esp.batches.values()
    assert batch["tag"] == "job_5F1_2Ea"
    assert decode_tag(batch["tag"]) == "job_1.a"
    assert first.state is ImportState.DONE
    assert (first.rows_valid, first.rows_invalid) == (3, 1)
    assert first.import_id == "5001:3:1"
    assert sorted(esp.chunks[5001]) == ["c000001", "c000002"]
    staged = esp.chunks[5001]["c000001"]
    assert staged[0]["data"] == {
        "email": "anna@example.com",
        "firstname": "Anna",
        "CommunicationKey": "K1",
        "BroadcastId": "job_1.a",
    }
    assert esp.chunks[5001]["c000002"][0]["data"]["firstname"] == 'Carl; "CJ"'
    assert first.errors == (
        "chunk c000001 (lines 2-3): 1 of 2 recipients failed Optimizely's pre-validation",
    )
    again = await c.start_import(path, j)  # a redelivery: the batch is found, chunks are replaced
    assert esp.created == 1
    assert again.import_id == first.import_id
    listing = [s for s in esp.seen if (s.method, s.path) == ("GET", f"/{CLIENT}/sending/batches")]
    assert all(s.query["limit"] == "1000" for s in listing)


async def test_start_import_skips_invalid_batches_and_stops_at_a_sent_one(esp: FakeOptimizely) -> None:
    esp.batch("job-1", state="invalid")
    esp.batch("other", state="initiated")
    c = connector(esp)
    status = await c.start_import(LIST_PATH, job(message="7001"))
    assert esp.created == 1
    assert status.import_id.startswith("5003:")
    esp.batches[5003]["state"] = "sent"
    already = await c.start_import(LIST_PATH, job(message="7001"))
    assert (already.state, already.import_id) == (ImportState.DONE, "5003:0:0")
    assert esp.created == 1


async def test_batches_are_paged_with_the_page_size(esp: FakeOptimizely) -> None:
    for i in range(4):
        esp.batch(f"other-{i}", state="sent")
    esp.batch("job-1", state="has_recipients")
    c = connector(esp, page_size=2)
    assert await c.find_send(job()) is None
    listing = [s.query for s in esp.seen if s.path == f"/{CLIENT}/sending/batches"]
    assert [(q["offset"], q["limit"]) for q in listing] == [("0", "2"), ("2", "2"), ("4", "2")]


async def test_an_empty_or_all_invalid_list_fails_the_import(esp: FakeOptimizely) -> None:
    files = {LIST_PATH: b"email;CommunicationKey\nno-at;K1\n", "empty.csv": b"email;CommunicationKey\n"}
    c = connector(esp, files=files)
    status = await c.start_import(LIST_PATH, job(message="7001"))
    assert (status.state, status.rows_valid, status.rows_invalid) == (ImportState.FAILED, 0, 1)
    assert (await c.import_status(status.import_id)).state is ImportState.FAILED
    empty = await c.start_import("empty.csv", job(job_id="job-2", message="7001"))
    assert empty.state is ImportState.FAILED
    assert "no recipients" in empty.errors[-1]


async def test_upload_only_makes_no_call_and_a_send_ahead_of_its_time_is_refused(
    esp: FakeOptimizely,
) -> None:
    c = connector(esp)
    only = await c.start_import(LIST_PATH, job(mode=SendMode.UPLOAD_ONLY.value))
    assert (only.state, only.import_id) == (ImportState.DONE, "file:job-1.csv")
    assert (await c.import_status(only.import_id)).state is ImportState.DONE
    assert esp.seen == []
    later = job(send_at=(datetime.now(UTC) + timedelta(days=3)).isoformat(), message="7001")
    staged = await c.start_import(LIST_PATH, later)  # the list is staged at once, days ahead
    assert staged.state is ImportState.DONE
    calls = len(esp.seen)
    with pytest.raises(SendAtNotSupportedError, match="sent at its time"):
        await c.send(staged.import_id, later)
    assert len(esp.seen) == calls, "no call made for a send ahead of its time"
    soon = job(send_at=(datetime.now(UTC) + timedelta(seconds=200)).isoformat(), message="7001")
    assert (await c.send(staged.import_id, soon)).state is SendState.SCHEDULED


async def test_import_states_map(esp: FakeOptimizely) -> None:
    c = connector(esp)
    for state in ("initiated", "has_recipients", "sent", "invalid"):
        esp.batch(f"t-{state}", state=state)
    assert (await c.import_status("5001:0:0")).state is ImportState.FAILED
    done = await c.import_status("5002:7:2")
    assert (done.state, done.rows_valid, done.rows_invalid) == (ImportState.DONE, 7, 2)
    assert (await c.import_status("5003:0:0")).state is ImportState.DONE
    assert (await c.import_status("5004:7:0")).state is ImportState.FAILED
    with pytest.raises(ListRejectedError):
        await c.import_status("5999:1:0")
    with pytest.raises(PermanentError):
        await c.import_status("nonsense")


# --- sends ----------------------------------------------------------------------------------------------


async def test_send_202_then_409_follows_the_sent_batch(esp: FakeOptimizely) -> None:
    c = connector(esp)
    imp = await c.start_import(LIST_PATH, job(message="7001"))
    assert await c.find_send(job()) is None
    send = await c.send(imp.import_id, job())
    assert (send.send_id, send.state) == ("5001", SendState.SCHEDULED)
    posts = [s for s in esp.seen if (s.method, s.path) == ("POST", f"/{CLIENT}/sending/batches/5001")]
    assert len(posts) == 1
    again = await c.send(imp.import_id, job())  # 409: the batch is sent, so it is followed
    assert (again.send_id, again.state) == ("5001", SendState.SCHEDULED)
    found = await c.find_send(job())
    assert found is not None
    assert found.send_id == "5001"


async def test_send_409_on_an_unsent_batch_is_permanent(esp: FakeOptimizely) -> None:
    esp.batch("job-1", state="initiated")
    c = connector(esp)
    with pytest.raises(ListRejectedError, match="batch is initiated"):
        await c.send("5001:0:0", job())
    with pytest.raises(ListRejectedError):
        await c.send("file:job-1.csv", job())


async def test_send_status_follows_batch_and_campaign(esp: FakeOptimizely) -> None:
    c = connector(esp)
    esp.batch("job-1", state="has_recipients", campaign=7002)
    assert (await c.send_status("5001")).state is SendState.SCHEDULED
    esp.batches[5001]["state"] = "sent"
    campaign = esp.campaigns[7002]
    expected = {
        "activationRequired": SendState.SCHEDULED,
        "activated": SendState.SCHEDULED,
        "running": SendState.SENDING,
        "paused": SendState.SENDING,
        "canceled": SendState.FAILED,
        "invalid": SendState.FAILED,
    }
    for status, state in expected.items():
        campaign["status"] = status
        result = await c.send_status("5001")
        assert result.state is state, status
        assert status in result.detail
    campaign["status"], campaign["total"] = "finished", 3
    done = await c.send_status("5001")
    assert (done.state, done.recipients) == (SendState.SENT, 3)
    esp.batches[5001]["state"] = "invalid"
    assert (await c.send_status("5001")).state is SendState.FAILED


# --- cancel --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome", "detail", "stopped"),
    [
        (
            "activated",
            CancelOutcome.CANCELLED,
            "campaign 7002 cancelled while activated: nothing was sent",
            True,
        ),
        (
            "running",
            CancelOutcome.CANCELLED,
            "campaign 7002 cancelled while running: recipients reached before it got the mailing",
            True,
        ),
        ("finished", CancelOutcome.TOO_LATE, "campaign 7002 finished: it was sent", False),
        ("canceled", CancelOutcome.CANCELLED, "campaign 7002 is canceled: nothing more is sent", False),
    ],
)
async def test_a_cancel_stops_the_batchs_campaign_unless_it_finished(
    esp: FakeOptimizely, status: str, outcome: CancelOutcome, detail: str, stopped: bool
) -> None:
    esp.batch("job-1", state="sent", campaign=7002)
    esp.campaigns[7002]["status"] = status
    result = await connector(esp).cancel_send("5001", job())
    assert (result.outcome, result.detail) == (outcome, detail)
    stops = [(s.method, s.path) for s in esp.calls("/stop")]
    assert stops == ([("POST", f"/{CLIENT}/smartcampaigns/7002/stop")] if stopped else [])
    assert (await connector(esp).send_status("5001")).state is (
        SendState.SENT if status == "finished" else SendState.FAILED
    )


async def test_a_batch_never_started_is_cancelled_without_a_call(esp: FakeOptimizely) -> None:
    esp.batch("job-1", state="has_recipients", campaign=7002)
    result = await connector(esp).cancel_send("5001", job())
    assert (result.outcome, result.detail) == (
        CancelOutcome.CANCELLED,
        "batch 5001 is has_recipients: never started, nothing sent",
    )
    assert esp.calls("/smartcampaigns") == []


@pytest.mark.parametrize(
    ("moved_on", "outcome"), [("finished", CancelOutcome.TOO_LATE), ("canceled", CancelOutcome.CANCELLED)]
)
async def test_a_campaign_that_moved_on_before_the_stop_is_read_again(
    esp: FakeOptimizely, moved_on: str, outcome: CancelOutcome
) -> None:
    esp.batch("job-1", state="sent", campaign=7002)
    esp.campaigns[7002]["status"], esp.moved_on = "running", moved_on
    assert (await connector(esp).cancel_send("5001", job())).outcome is outcome


async def test_a_stop_refused_while_the_campaign_still_runs_is_asked_again_later(esp: FakeOptimizely) -> None:
    esp.batch("job-1", state="sent", campaign=7002)
    esp.campaigns[7002]["status"], esp.moved_on = "activated", "activationRequired"
    with pytest.raises(EspUnavailableError, match="could not be cancelled while activationRequired"):
        await connector(esp).cancel_send("5001", job())
    with pytest.raises(PermanentError, match="not an Optimizely batch id"):
        await connector(esp).cancel_send("x", job())


# --- API pulls ------------------------------------------------------------------------------------------


def bounce(recipient: str, category: str, created: str, mailing: int = 8004) -> dict[str, Any]:
    return {
        "mailId": f"{mailing}-{recipient}",
        "mailingId": mailing,
        "recipientListId": 3001,
        "recipientId": recipient,
        "category": category,
        "subject": "Undelivered Mail",
        "ruleName": "mailbox unknown",
        "mediaType": "EMAIL",
        "created": created,
    }


def unsubscribe(recipient: str, created: str, mailing: int | None = 8004) -> dict[str, Any]:
    element: dict[str, Any] = {
        "recipientListId": 3001,
        "recipientId": recipient,
        "reason": "link",
        "created": created,
        "mediaType": "EMAIL",
    }
    if mailing is not None:
        element["mailingId"] = mailing
    return element


async def test_bounces_and_unsubscribes_are_pulled_and_resumed_from_the_cursor(esp: FakeOptimizely) -> None:
    esp.batch("job-1", state="sent", campaign=7002)
    esp.bounces = [
        bounce("K1", "hardbounce", "2026-11-22T11:00:09.000+01:00"),
        bounce("K2", "hardbounce", "2026-11-22T11:00:10.000+01:00"),
        bounce("K3", "hardbounce", "2026-11-22T10:00:11Z"),
        bounce("K4", "softbounce", "2026-11-22T11:00:12.5+01:00"),
        bounce("K5", "hardbounce", "2026-11-22T11:00:13+01:00", mailing=9999),
        {**bounce("", "hardbounce", "2026-11-22T11:00:14+01:00"), "mailingId": 8004},
    ]
    esp.unsubscribes = [
        unsubscribe("K9", "2026-11-22T10:00:00+01:00"),  # before the send was requested
        unsubscribe("K1", "2026-11-22T11:00:10+01:00"),
        unsubscribe("X1", "2026-11-22T11:00:20+01:00", mailing=9999),
        unsubscribe("X2", "2026-11-22T11:00:30+01:00", mailing=None),
        unsubscribe("K2", "2026-11-22T11:00:40+01:00"),
    ]
    c = connector(esp, page_size=2)
    b = broadcast()
    nothing = await c.pull_responses(b, None)  # the campaign is not running yet
    assert (nothing.items, nothing.cursor, nothing.more) == ((), None, False)
    esp.campaigns[7002]["status"] = "running"
    items, cursor, _ = await pull_round(c, b, None)
    events = [i for i in items if isinstance(i, ResponseEvent)]
    bad = [i for i in items if isinstance(i, BadRow)]
    assert [(e.type, e.communication_key) for e in events] == [
        (EventType.BOUNCE_HARD, "K1"),
        (EventType.BOUNCE_HARD, "K2"),
        (EventType.BOUNCE_HARD, "K3"),
        (EventType.BOUNCE_SOFT, "K4"),
        (EventType.UNSUBSCRIBE, "K2"),
        (EventType.UNSUBSCRIBE, "K1"),
    ]
    assert len(bad) == 1
    assert "recipientId" in bad[0].error
    first = events[0]
    assert first.broadcast_id == "job-1"
    assert first.esp_message_id == "8004"
    assert first.occurred_at == datetime(2026, 11, 22, 10, 0, 9, tzinfo=UTC)
    assert first.extra == {"mailId": "8004-K1", "ruleName": "mailbox unknown"}
    assert first.source.kind == "api"
    assert events[3].occurred_at == datetime(2026, 11, 22, 10, 0, 12, tzinfo=UTC)  # to the second
    assert events[4].extra == {"reason": "link"}
    responses = [s.query for s in esp.seen if s.path == f"/{CLIENT}/responses"]
    assert all(q["limit"] == "10000" and q["mailingId"] == "8004" and "offset" not in q for q in responses)
    listed = [s.query for s in esp.seen if s.method == "GET" and s.path != f"/{CLIENT}/responses"]
    assert all(int(q.get("limit", "0")) < 10000 for q in listed)

    esp.bounces.append(bounce("K6", "hardbounce", "2026-11-22T11:05:00+01:00"))
    esp.unsubscribes.append(unsubscribe("K7", "2026-11-22T11:06:00+01:00"))
    seen_before = len(esp.seen)
    more, cursor2, _ = await pull_round(c, b, cursor)
    old_ids = {e.event_id for e in events}
    new = {(e.type, e.communication_key) for e in more if isinstance(e, ResponseEvent)}
    new_ids = {e.event_id for e in more if isinstance(e, ResponseEvent)} - old_ids
    assert new >= {(EventType.BOUNCE_HARD, "K6"), (EventType.UNSUBSCRIBE, "K7")}
    assert len(new_ids) == 2  # the mailing's page is read again whole: anything read again has the same id
    assert [s.query["category"] for s in esp.seen[seen_before:] if s.path == f"/{CLIENT}/responses"] == [
        "hardbounce",
        "softbounce",
    ]

    # Nothing new: the newest unsubscribe (read again, since its second may not be over) is not
    # pulled again; one arriving later in that same second is pulled, once.
    again, cursor3, _ = await pull_round(c, b, cursor2)
    assert [e for e in again if isinstance(e, ResponseEvent) and e.type is EventType.UNSUBSCRIBE] == []
    esp.unsubscribes.append(unsubscribe("K8", "2026-11-22T11:06:00+01:00"))
    late, cursor4, _ = await pull_round(c, b, cursor3)
    known = old_ids | new_ids
    assert [
        (e.type, e.communication_key)
        for e in late
        if isinstance(e, ResponseEvent) and e.event_id not in known
    ] == [(EventType.UNSUBSCRIBE, "K8")]
    final, _, _ = await pull_round(c, b, cursor4)
    assert [e for e in final if isinstance(e, ResponseEvent) and e.type is EventType.UNSUBSCRIBE] == []
    assert {e.event_id for e in final if isinstance(e, ResponseEvent)} <= known, "bounces read again"


async def test_another_mailings_newer_unsubscribes_do_not_hide_this_broadcasts_later_ones(
    esp: FakeOptimizely,
) -> None:
    esp.batch("job-1", state="sent", campaign=7002)
    esp.campaigns[7002]["status"] = "running"
    esp.unsubscribes = [unsubscribe("X9", "2026-11-22T20:00:00+01:00", mailing=9999)]
    c = connector(esp, page_size=2)
    b = broadcast()
    first, cursor, _ = await pull_round(c, b, None)
    assert [i for i in first if isinstance(i, ResponseEvent)] == []
    # This broadcast's unsubscribe arrives later but is older than the other mailing's newest.
    esp.unsubscribes.append(unsubscribe("K1", "2026-11-22T11:00:10+01:00"))
    second, _, _ = await pull_round(c, b, cursor)
    assert [(e.type, e.communication_key) for e in second if isinstance(e, ResponseEvent)] == [
        (EventType.UNSUBSCRIBE, "K1")
    ]


async def test_an_unreadable_cursor_starts_over(esp: FakeOptimizely) -> None:
    esp.batch("job-1", state="sent", campaign=7002)
    esp.campaigns[7002]["status"] = "running"
    c = connector(esp)
    first = await c.pull_responses(broadcast(), "not json")
    assert first.more
    assert first.cursor is not None
    assert orjson.loads(first.cursor)["mailings"] == [8004]


# --- response files -------------------------------------------------------------------------------------

HEADER = (
    "Email;Urn;CommunicationKey;MessageType;DeliveryDate;ClickUrl;ClickDate;EventTriggeredDate;"
    "BounceType;BroadcastId"
)


def parse(tmp_path: Path, c: OptimizelyConnector, text: str) -> list[ResponseEvent | BadRow]:
    path = tmp_path / "Response_5001_20261122130000_001.csv"
    path.write_bytes(text.encode("utf-8"))
    return list(c.parse_response_file(path, "optimizely/demo/responses/Response_5001_20261122130000_001.csv"))


async def test_response_files_map_rows_with_berlin_times(tmp_path: Path, esp: FakeOptimizely) -> None:
    c = connector(esp)
    text = (
        f"\ufeff{HEADER}\r\n"
        "a@example.com;K1;K1;Send;22.11.2026 11:00:00;;;22.11.2026 11:00:00;;job-1\r\n"
        'a@example.com;K1;K1;Click;22.11.2026 11:00:00;"https://example.com/a?x=1;y=2";'
        "22.11.2026 13:14:05;22.11.2026 13:14:05;;job-1\r\n"
        "b@example.com;K2;K2;Bounce;22.07.2026 11:00:00;;;22.07.2026 11:00:09;hardbounce;job-1\r\n"
        "b@example.com;K2;K2;Bounce;25.10.2026 02:00:00;;;25.10.2026 02:30:00;softbounce;job-1\r\n"
        "c@example.com;K3;K3;Open;22.11.2026 11:00:00;;;22.11.2026 12:00:00;;job-1\r\n"
        "c@example.com;K3;K3;Unsubscription;22.11.2026 11:00:00;;;22.11.2026 12:30:00;;job-1\r\n"
        "d@example.com;K4;K4;Open;22.11.2026 11:00:00;;;22.11.2026 12:00:00;;\r\n"  # not ours: skipped
    )
    items = parse(tmp_path, c, text)
    assert all(isinstance(i, ResponseEvent) for i in items)
    events = [i for i in items if isinstance(i, ResponseEvent)]
    assert [e.type for e in events] == [
        EventType.SENT,
        EventType.CLICK,
        EventType.BOUNCE_HARD,
        EventType.BOUNCE_SOFT,
        EventType.OPEN,
        EventType.UNSUBSCRIBE,
    ]
    click = events[1]
    assert click.url == "https://example.com/a?x=1;y=2"
    assert click.occurred_at == datetime(2026, 11, 22, 12, 14, 5, tzinfo=UTC)  # CET, +01:00
    assert events[2].occurred_at == datetime(2026, 7, 22, 9, 0, 9, tzinfo=UTC)  # CEST, +02:00
    assert events[3].occurred_at == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # the first 02:30
    assert (click.communication_key, click.email, click.broadcast_id) == ("K1", "a@example.com", "job-1")
    assert click.esp_message_id is None
    assert click.extra == {"DeliveryDate": "22.11.2026 11:00:00"}
    assert (click.source.kind, click.source.line) == ("file", 3)
    assert events[0].url is None
    again = parse(tmp_path, c, text)
    assert [i.event_id for i in again if isinstance(i, ResponseEvent)] == [e.event_id for e in events]


async def test_response_file_bad_rows_keep_their_line(tmp_path: Path, esp: FakeOptimizely) -> None:
    c = connector(esp)
    rows = [
        "a@example.com;K1;K1;Teleport;22.11.2026 11:00:00;;;22.11.2026 11:00:00;;job-1",
        "a@example.com;K1;K1;Open;22.11.2026 11:00:00;;;2026-11-22 11:00:00;;job-1",
        "a@example.com;K1;K1;Open;22.11.2026 11:00:00",
        "a@example.com;K1;K1;Bounce;22.11.2026 11:00:00;;;22.11.2026 11:00:00;;job-1",
        "a@example.com;K1;K1;Click;22.11.2026 11:00:00;;;22.11.2026 11:00:00;;job-1",
        'a@example.com;K1;K1;Open;22.11.2026 11:00:00;;;22.11.2026 11:00:01;"x\ny";job-1',
    ]
    items = parse(tmp_path, c, "\n".join([HEADER, *rows, ""]))
    bad = {i.line: i.error for i in items if isinstance(i, BadRow)}
    good = [i for i in items if isinstance(i, ResponseEvent)]
    assert set(bad) == {2, 3, 4, 5, 6}
    assert "unknown MessageType 'Teleport'" in bad[2]
    assert "EventTriggeredDate" in bad[3]
    assert "5 fields" in bad[4]
    assert "unknown MessageType 'Bounce'" in bad[5]
    assert "ClickUrl" in bad[6]
    assert [(g.type, g.source.line) for g in good] == [(EventType.OPEN, 7)]
    (whole,) = parse(tmp_path, c, "Email;Urn;MessageType\na;K1;Open\n")
    assert isinstance(whole, BadRow)
    assert whole.line == 1
    assert "EventTriggeredDate" in whole.error


async def test_a_plain_bounce_can_be_mapped(tmp_path: Path, esp: FakeOptimizely) -> None:
    c = connector(esp, message_types={"Bounce": "bounce_hard"})
    (event,) = parse(tmp_path, c, f"{HEADER}\na;K1;K1;Bounce;;;;22.11.2026 11:00:00;;job-1\n")
    assert isinstance(event, ResponseEvent)
    assert event.type is EventType.BOUNCE_HARD


# --- webhooks -------------------------------------------------------------------------------------------


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


WEBHOOK_BODY = orjson.dumps(
    [
        {
            "webhookId": 11,
            "type": "click",
            "clientId": CLIENT,
            "mailingId": 8004,
            "recipientListId": 3001,
            "recipientId": "K1",
            "mailId": "8004-K1",
            "created": "2026-11-22T13:14:05.000+01:00",
            "url": "https://example.com/a?x=1;y=2",
            "data": {"email": "a@example.com", "CommunicationKey": "K1", "BroadcastId": "job-1"},
        }
    ]
)


@pytest.mark.parametrize(
    ("options", "headers", "ok"),
    [
        ({}, {"Authorization": basic("espbridge", SECRET)}, True),
        ({}, {"authorization": basic("espbridge", SECRET)}, True),
        ({}, {"Authorization": basic("espbridge", "wrong")}, False),
        ({}, {"Authorization": basic("someone", SECRET)}, False),
        ({}, {"Authorization": f"Bearer {SECRET}"}, False),
        ({}, {"Authorization": "Basic !!!"}, False),
        ({}, {}, False),
        ({"webhook_auth": "keyAuth"}, {"Authorization": f"Bearer {SECRET}"}, True),
        ({"webhook_auth": "keyAuth"}, {"Authorization": f"Bearer {SECRET}x"}, False),
        ({"webhook_auth": "keyAuth"}, {"Authorization": f"bearer {SECRET}"}, False),
        ({"webhook_auth": "keyAuth"}, {}, False),
        ({"webhook_auth": "keyAuth", "webhook_key_header": "X-Hook-Key"}, {"X-Hook-Key": SECRET}, True),
        ({"webhook_auth": "keyAuth", "webhook_key_header": "X-Hook-Key"}, {"Authorization": SECRET}, False),
        ({"webhook_auth": "none"}, {}, True),
    ],
)
async def test_webhook_authentication(
    esp: FakeOptimizely, options: dict[str, Any], headers: dict[str, str], ok: bool
) -> None:
    c = connector(esp, **options)
    if ok:
        (event,) = c.parse_webhook(headers, WEBHOOK_BODY)
        assert isinstance(event, ResponseEvent)
    else:
        with pytest.raises(WebhookAuthError):
            c.parse_webhook(headers, WEBHOOK_BODY)


async def test_webhook_items_become_events_and_bad_items_keep_their_index(esp: FakeOptimizely) -> None:
    c = connector(esp)
    auth = {"Authorization": basic("espbridge", SECRET)}
    data = {"email": "b@example.com", "CommunicationKey": "K2", "BroadcastId": "job-1"}
    base = {"mailingId": 8004, "recipientId": "K2", "created": "2026-11-22T10:00:09Z", "data": data}
    body = [
        {**base, "type": "sent"},
        {**base, "type": "bounce", "category": "softbounce"},
        {**base, "type": "unsubscribe", "reason": "link"},
        {**base, "type": "spamcomplaint"},
        {**base, "type": "doubleoptin"},
        {**base, "type": "bounce"},
        {k: v for k, v in base.items() if k != "recipientId"} | {"type": "open"},
        {**base, "type": "open", "created": "yesterday"},
        {**base, "type": "open", "data": {"email": "x@y.z"}},
        {**base, "type": "click"},
        {**base, "type": "teleport"},
    ]
    items = c.parse_webhook(auth, orjson.dumps(body))
    events = [i for i in items if isinstance(i, ResponseEvent)]
    bad = {i.line: i.error for i in items if isinstance(i, BadRow)}
    assert [e.type for e in events] == [
        EventType.SENT,
        EventType.BOUNCE_SOFT,
        EventType.UNSUBSCRIBE,
        EventType.COMPLAINT,
    ]
    assert events[2].extra == {"reason": "link"}
    assert (events[0].email, events[0].esp_message_id, events[0].source.kind) == (
        "b@example.com",
        "8004",
        "webhook",
    )
    assert set(bad) == {6, 7, 8, 9, 10, 11}
    assert "recipientId" in bad[7]
    assert "BroadcastId" in bad[9]
    (single,) = c.parse_webhook(auth, orjson.dumps({**base, "type": "open"}))
    assert isinstance(single, ResponseEvent)
    with pytest.raises(PermanentError):
        c.parse_webhook(auth, b"not json")


async def test_one_event_from_a_file_the_api_and_a_webhook_has_one_id(
    tmp_path: Path, esp: FakeOptimizely
) -> None:
    esp.batch("job-1", state="sent", campaign=7002)
    esp.campaigns[7002]["status"] = "finished"
    esp.bounces = [bounce("K7", "hardbounce", "2026-11-22T11:00:09.000+01:00")]
    c = connector(esp)
    pulled, _, _ = await pull_round(c, broadcast(), None)
    (from_api,) = [i for i in pulled if isinstance(i, ResponseEvent)]
    (from_file, file_click) = parse(
        tmp_path,
        c,
        f"{HEADER}\n"
        "g@example.com;K7;K7;Bounce;22.11.2026 11:00:00;;;22.11.2026 11:00:09;hardbounce;job-1\n"
        'a@example.com;K1;K1;Click;22.11.2026 11:00:00;"https://example.com/a?x=1;y=2";'
        "22.11.2026 13:14:05;22.11.2026 13:14:05;;job-1\n",
    )
    hook = {
        "type": "bounce",
        "category": "hardbounce",
        "mailingId": 8004,
        "recipientId": "K7",
        "created": "2026-11-22T10:00:09.250Z",
        "data": {"email": "g@example.com", "BroadcastId": "job-1"},
    }
    auth = {"Authorization": basic("espbridge", SECRET)}
    (from_hook,) = c.parse_webhook(auth, orjson.dumps([hook]))
    (hook_click,) = c.parse_webhook(auth, WEBHOOK_BODY)
    assert isinstance(from_file, ResponseEvent)
    assert isinstance(from_hook, ResponseEvent)
    assert isinstance(file_click, ResponseEvent)
    assert isinstance(hook_click, ResponseEvent)
    assert from_api.event_id == from_file.event_id == from_hook.event_id
    assert file_click.event_id == hook_click.event_id


@pytest.mark.parametrize("kind", ["archive", "archived", "filteredbyblocklist"])
async def test_webhook_types_espbridge_does_not_load_are_passed_over_not_dead_lettered(
    esp: FakeOptimizely, kind: str
) -> None:
    c = connector(esp)
    auth = {"Authorization": basic("espbridge", SECRET)}
    data = {"email": "b@example.com", "CommunicationKey": "K2", "BroadcastId": "job-1"}
    item = {"mailingId": 8004, "recipientId": "K2", "created": "2026-11-22T10:00:09Z", "data": data}
    assert c.parse_webhook(auth, orjson.dumps([{**item, "type": kind}])) == []
