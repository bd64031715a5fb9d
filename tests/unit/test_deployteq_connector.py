"""The deployteq connector against small fakes of what docs/connectors/deployteq.md documents.

* The CSV-trigger folders: an in-memory :class:`SiteFiles` (the connector's folder interface),
  moved by the test the way Deployteq would move a file; and once the real SFTP implementation
  against an in-process asyncssh SFTP server on loopback.
* The Events API and its OAuth2 token endpoint: a tiny aiohttp fake on 127.0.0.1 speaking only
  the documented requests, answers and errors.
* The activities export: files written here in the documented format.

The sandbox's deployteq flavor is tested elsewhere; nothing here is shared with it.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote
from zoneinfo import ZoneInfo

import aiohttp
import asyncssh
import orjson
import pytest
from aiohttp import web
from pydantic import SecretStr

from shared.esp import (
    AccountConfig,
    BadRow,
    ConnectorContext,
    ImportState,
    ImportStatus,
    SendState,
    SentBroadcast,
    WebhookAuthError,
)
from shared.esp.base import CancelOutcome
from shared.esp.deployteq import DeployteqConnector, SiteFiles, job_id_of
from shared.esp.registry import CONNECTORS
from shared.esp.rest import EspAuthError, EspRequestError
from shared.infra.settings import SftpSettings
from shared.infra.sftp import SftpPool
from shared.model.errors import ConfigurationError, PermanentError
from shared.model.messages import BroadcastJob, EventType, ResponseEvent, event_id_for
from tests.fixtures.fake_esp import OFFLINE, FakeEsp, Seen, pulled, served
from tests.fixtures.waits import wait_for
from tests.unit.test_messages import job

CLIENT_ID = "acme"
SECRET = "s3cret"
ROOT = "deployteq/acme"
NAME = "newsletter+job-1.csv"
STAGING = f"{ROOT}/espbridge/staging"
TRIGGER = f"{ROOT}/csv upload/espbridge"
AMS = ZoneInfo("Europe/Amsterdam")
T0 = datetime(2026, 11, 22, 9, 0, tzinfo=UTC).timestamp()


def deployteq_job(**overrides: object) -> BroadcastJob:
    values: dict[str, object] = {
        "esp": "deployteq",
        "account": "acme",
        "message": "newsletter",
        "field_map": {"email": "emailAddress", "first_name": "firstName"},
    }
    return job(**{**values, **overrides})


# --- the folder fake -------------------------------------------------------------------------------


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeSite:
    """The trigger folders in memory: path → (content, mtime)."""

    files: dict[str, tuple[bytes, float]] = field(default_factory=dict)
    ops: list[tuple[str, ...]] = field(default_factory=list)
    refuse_touch: bool = False

    def session(self) -> AbstractAsyncContextManager[SiteFiles]:
        return self._session()

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[SiteFiles]:
        yield self

    async def stat(self, path: str) -> float | None:
        return self.files[path][1] if path in self.files else None

    async def rename(self, source: str, target: str, *, overwrite: bool = False) -> bool:
        if source not in self.files or (target in self.files and not overwrite):
            return False
        self.files[target] = self.files.pop(source)
        self.ops.append(("rename", source, target))
        return True

    async def touch(self, path: str, mtime: float) -> bool:
        self.ops.append(("touch", path))
        if self.refuse_touch or path not in self.files:
            return False
        self.files[path] = (self.files[path][0], mtime)
        return True

    async def remove(self, path: str) -> bool:
        self.ops.append(("remove", path))
        return self.files.pop(path, None) is not None

    async def head(self, path: str, limit: int) -> bytes | None:
        return self.files[path][0][:limit] if path in self.files else None

    # what Deployteq does
    def put(
        self, folder: str, name: str = NAME, content: bytes = b"emailAddress;externalId\r\n", at: float = T0
    ) -> None:
        self.files[f"{folder}/{name}"] = (content, at)

    def move(self, src: str, dst: str, name: str = NAME) -> None:
        self.files[f"{TRIGGER}/{dst}/{name}"] = self.files.pop(f"{TRIGGER}/{src}/{name}")

    def where(self, name: str = NAME) -> list[str]:
        return sorted(p.removesuffix(f"/{name}") for p in self.files if p.endswith(f"/{name}"))


def account(url: str = "http://127.0.0.1:1", secret: str = SECRET, **options: Any) -> AccountConfig:
    return AccountConfig(
        esp="deployteq",
        account="acme",
        connector="deployteq",
        api_url=f"{url}/analytics-events",
        client_id=CLIENT_ID,
        client_secret=SecretStr(secret),
        options={"token_url": f"{url}/oauth2/token", **options},
    )


def folders(site: FakeSite, clock: Clock, **options: Any) -> DeployteqConnector:
    return DeployteqConnector(account(**options), OFFLINE, site=site, clock=clock)


# --- configuration and the list file ----------------------------------------------------------------


def test_registered_with_the_documented_list_format_and_sources() -> None:
    assert CONNECTORS["deployteq"] is DeployteqConnector
    c = folders(FakeSite(), Clock())
    fmt = c.list_format
    assert (fmt.delimiter, fmt.encoding, fmt.line_terminator, fmt.suffix) == (";", "utf-8", "\r\n", ".csv")
    assert (fmt.email_field, fmt.key_field) == ("emailAddress", "externalId")
    assert (c.can_send, c.pulls_api) == (True, True)
    assert [(s.folder, s.pattern) for s in c.response_sources] == [("event-export", "activities_*.csv")]
    assert c.archive_folder == "event-export/archive"
    assert c.list_path(deployteq_job()) == f"{STAGING}/{NAME}"
    other = folders(FakeSite(), Clock(), staging_folder="out/held", brand="acme")
    assert other.list_path(deployteq_job(job_id="j.2:x")) == f"{ROOT}/out/held/newsletter+j.2:x.csv"


def test_trigger_file_names_map_back_to_job_ids() -> None:
    assert job_id_of("newsletter+job-1.csv") == "job-1"
    assert job_id_of("a.b-c_d+j.2:x.csv") == "j.2:x"
    for bad in ("newsletter+job-1.txt", "newsletter.csv", "+job-1.csv", "a+b+c.csv", "x y+job-1.csv", ""):
        assert job_id_of(bad) is None, bad


async def test_upload_only_and_bad_trigger_names_are_refused_before_anything_moves() -> None:
    site, clock = FakeSite(), Clock()
    c = folders(site, clock)
    with pytest.raises(PermanentError, match="upload_and_send"):
        c.list_path(deployteq_job(mode="upload_only"))
    with pytest.raises(PermanentError, match="not a Deployteq trigger name"):
        c.list_path(deployteq_job(message="msg 42"))
    site.put(STAGING)
    with pytest.raises(PermanentError, match="upload_and_send"):
        await c.start_import(f"{STAGING}/{NAME}", deployteq_job(mode="upload_only"))
    with pytest.raises(PermanentError, match="not the staged list file"):
        await c.start_import(f"{ROOT}/elsewhere/{NAME}", deployteq_job())
    assert site.where() == [STAGING]
    assert site.ops == []


def test_bounces_can_come_from_the_export_instead() -> None:
    c = folders(
        FakeSite(),
        Clock(),
        api_metrics={"sends": "sent", "opens": "open", "clicks": "click", "unsubscribes": "unsubscribe"},
        export_types={"BOUNCE": "bounce"},
    )
    assert c.options.export_types["COMPLAINT"] == "complaint"  # merged over the defaults
    assert c.options.export_event_types() == {"complaint", "bounce_hard", "bounce_soft"}
    assert "bounce_hard" not in c.options.api_types()


def test_credentials_are_required() -> None:
    bare = AccountConfig(esp="deployteq", account="acme", connector="deployteq", api_url="http://x/a")
    with pytest.raises(ConfigurationError, match="client_id"):
        DeployteqConnector(bare, OFFLINE)


# --- release and the folders -------------------------------------------------------------------------


async def test_release_renames_staging_into_upload_and_follows_the_folders() -> None:
    site, clock = FakeSite(), Clock()
    c = folders(site, clock)
    j = deployteq_job()
    site.put(STAGING, at=T0 - 3600)  # uploaded an hour ago
    clock.now = T0 + 5
    imp = await c.start_import(c.list_path(j), j)
    assert imp == ImportStatus(NAME, ImportState.QUEUED)
    assert site.where() == [f"{TRIGGER}/Upload"]
    assert site.files[f"{TRIGGER}/Upload/{NAME}"][1] == T0 + 5  # mtime set to the release time
    assert ("rename", f"{STAGING}/{NAME}", f"{TRIGGER}/Upload/{NAME}") in site.ops
    assert (await c.start_import(c.list_path(j), j)).state is ImportState.QUEUED  # idempotent
    assert [o for o in site.ops if o[0] == "rename"] == [
        ("rename", f"{STAGING}/{NAME}", f"{TRIGGER}/Upload/{NAME}")
    ]
    assert await c.find_send(j) == (await c.send_status(NAME))
    assert (await c.send_status(NAME)).state is SendState.SCHEDULED

    site.move("Upload", "Active")
    assert (await c.import_status(NAME)).state is ImportState.RUNNING
    assert (await c.send_status(NAME)).state is SendState.SENDING
    site.move("Active", "Done")
    done = await c.import_status(NAME)
    assert (done.state, done.rows_valid, done.rows_invalid) == (ImportState.DONE, 0, 0)
    sent = await c.send(NAME, j)
    assert (sent.send_id, sent.state, sent.recipients) == (NAME, SendState.SENT, 0)
    assert (await c.send_status(NAME)).state is SendState.SENT
    found = await c.find_send(j)
    assert found is not None
    assert found.state is SendState.SENT


async def test_a_redelivered_upload_is_deleted_from_staging_not_released_again() -> None:
    site, clock = FakeSite(), Clock()
    c = folders(site, clock)
    j = deployteq_job()
    site.put(f"{TRIGGER}/Done")
    site.put(STAGING)  # the uploader ran again after the release
    imp = await c.start_import(c.list_path(j), j)
    assert imp.state is ImportState.DONE
    assert site.where() == [f"{TRIGGER}/Done"]
    assert not [o for o in site.ops if o[0] == "rename"]


async def test_a_failed_file_reports_its_reason_file_or_the_notification_email() -> None:
    site, clock = FakeSite(), Clock()
    c = folders(site, clock)
    site.put(f"{TRIGGER}/Failed")
    imp = await c.import_status(NAME)
    assert imp.state is ImportState.FAILED
    assert imp.errors == ("rejected; see Deployteq's notification email",)
    reasons = "".join(f"line {n}: emailAddress missing\r\n" for n in range(2, 32)).encode()
    site.put(f"{TRIGGER}/Failed", f"{NAME}.reason.txt", reasons)
    imp = await c.import_status(NAME)
    assert imp.state is ImportState.FAILED
    assert len(imp.errors) == 20
    assert imp.errors[0] == "line 2: emailAddress missing"
    assert imp.errors[-1] == "line 21: emailAddress missing"
    send = await c.send_status(NAME)
    assert send.state is SendState.FAILED
    assert send.detail.startswith("line 2: emailAddress missing; line 3:")


async def test_a_file_no_campaign_takes_is_withdrawn_after_the_pickup_timeout() -> None:
    site, clock = FakeSite(), Clock()
    c = folders(site, clock, pickup_timeout_s=600)
    j = deployteq_job()
    site.put(STAGING)
    assert (await c.start_import(c.list_path(j), j)).state is ImportState.QUEUED
    clock.now = T0 + 599
    assert (await c.import_status(NAME)).state is ImportState.QUEUED
    assert site.where() == [f"{TRIGGER}/Upload"]
    clock.now = T0 + 600
    imp = await c.import_status(NAME)
    assert imp.state is ImportState.FAILED
    assert "no Deployteq campaign took trigger 'newsletter'" in imp.errors[0]
    assert site.where() == [STAGING]  # withdrawn: Deployteq will not send it any more
    again = await c.import_status(NAME)
    assert again.state is ImportState.FAILED
    assert "withdrawn" in again.errors[0]
    assert await c.find_send(j) is None


async def test_the_pickup_timeout_counts_from_the_release_even_when_setstat_fails() -> None:
    site, clock = FakeSite(refuse_touch=True), Clock()
    c = folders(site, clock)
    j = deployteq_job()
    site.put(STAGING, at=T0 - 7200)
    assert (await c.start_import(c.list_path(j), j)).state is ImportState.QUEUED
    assert (await c.import_status(NAME)).state is ImportState.QUEUED


async def test_send_at_holds_the_file_in_staging_until_the_first_poll_after_it() -> None:
    site, clock = FakeSite(), Clock()
    c = folders(site, clock)
    send_at = datetime.fromtimestamp(T0, UTC) + timedelta(hours=2)
    j = deployteq_job(send_at=send_at.isoformat())
    site.put(STAGING)
    imp = await c.start_import(c.list_path(j), j)
    assert imp == ImportStatus(f"staged:{NAME}", ImportState.DONE)
    assert (await c.import_status(imp.import_id)).state is ImportState.DONE
    send = await c.send(imp.import_id, j)
    assert (send.send_id, send.state) == (f"{NAME}@20261122T110000Z", SendState.SCHEDULED)
    assert await c.find_send(j) is None
    clock.now = T0 + 7199
    assert (await c.send_status(send.send_id)).state is SendState.SCHEDULED
    assert site.where() == [STAGING]
    assert not [o for o in site.ops if o[0] == "rename"]

    clock.now = T0 + 7200
    released = await c.send_status(send.send_id)
    assert released.state is SendState.SCHEDULED
    assert site.where() == [f"{TRIGGER}/Upload"]
    found = await c.find_send(j)
    assert found is not None
    assert found.send_id == send.send_id
    site.move("Upload", "Active")
    assert (await c.send_status(send.send_id)).state is SendState.SENDING
    site.move("Active", "Failed")
    failed = await c.send_status(send.send_id)
    assert (failed.state, failed.detail) == (SendState.FAILED, "rejected; see Deployteq's notification email")


async def test_send_after_send_at_releases_a_staged_import_at_once() -> None:
    site, clock = FakeSite(), Clock()
    c = folders(site, clock)
    j = deployteq_job(send_at=datetime.fromtimestamp(T0 + 60, UTC).isoformat())
    site.put(STAGING)
    imp = await c.start_import(c.list_path(j), j)
    clock.now = T0 + 61  # the import was held; the monitor sends after send_at
    send = await c.send(imp.import_id, j)
    assert send.state is SendState.SCHEDULED
    assert site.where() == [f"{TRIGGER}/Upload"]
    with pytest.raises(PermanentError, match="not the list file"):
        await c.send("other+job-9.csv", j)


async def test_a_vanished_file_fails_import_and_send() -> None:
    c = folders(FakeSite(), Clock())
    imp = await c.import_status(NAME)
    assert (imp.state, imp.errors[0][:19]) == (ImportState.FAILED, "list file vanished:")
    assert (await c.send_status(NAME)).state is SendState.FAILED
    assert (await c.start_import(f"{STAGING}/{NAME}", deployteq_job())).state is ImportState.FAILED
    with pytest.raises(PermanentError):
        await c.import_status("not-a-trigger-file")


# --- cancel: withdrawing the list file ------------------------------------------------------------------

WITHDRAWN = f"{STAGING}/{NAME}.cancelled"


@pytest.mark.parametrize("folder", [STAGING, f"{TRIGGER}/Upload"], ids=["held in staging", "not picked up"])
async def test_a_file_deployteq_has_not_taken_is_withdrawn_and_nothing_is_sent(folder: str) -> None:
    site, clock = FakeSite(), Clock()
    c = folders(site, clock)
    site.put(folder)
    result = await c.cancel_send(NAME, deployteq_job())
    where = folder.rsplit("/", 1)[1]
    assert (result.outcome, result.detail) == (
        CancelOutcome.CANCELLED,
        f"{NAME} withdrawn from {where} before Deployteq took it: nothing was sent "
        f"(kept as {NAME}.cancelled in staging)",
    )
    assert (site.where(), list(site.files)) == ([], [WITHDRAWN])
    again = await c.cancel_send(NAME, deployteq_job())
    assert (again.outcome, again.detail) == (CancelOutcome.CANCELLED, f"{NAME} was withdrawn before")


async def test_a_withdrawn_file_is_not_released_at_its_send_time() -> None:
    site, clock = FakeSite(), Clock()
    c = folders(site, clock)
    j = deployteq_job(send_at=datetime.fromtimestamp(T0 + 60, UTC).isoformat())
    site.put(STAGING)
    send = await c.send((await c.start_import(c.list_path(j), j)).import_id, j)
    await c.cancel_send(send.send_id, j)
    clock.now = T0 + 61
    assert (await c.send_status(send.send_id)).state is SendState.FAILED
    assert list(site.files) == [WITHDRAWN], "nothing went to Upload"


@pytest.mark.parametrize(
    ("folder", "detail"),
    [
        ("Active", "Deployteq took {name} (Active) and starts its campaign; Deployteq has no API call"),
        ("Done", "Deployteq started the campaign of {name} (Done); Deployteq has no API call"),
        ("Failed", "Deployteq rejected {name} (Failed): its campaign did not start"),
        (None, "{name} is in neither staging nor Deployteq's folders: nothing to withdraw"),
    ],
)
async def test_a_file_deployteq_took_is_too_late_to_withdraw(folder: str | None, detail: str) -> None:
    site = FakeSite()
    if folder is not None:
        site.put(f"{TRIGGER}/{folder}")
    result = await folders(site, Clock()).cancel_send(NAME, deployteq_job())
    assert result.outcome is CancelOutcome.TOO_LATE
    assert result.detail.startswith(detail.format(name=NAME))
    assert site.where() == ([f"{TRIGGER}/{folder}"] if folder else [])


@dataclass
class ReleasedMeanwhile(FakeSite):
    """A release by another monitor moves the staged file into Upload just before the withdrawal."""

    def __post_init__(self) -> None:
        self.released = False

    async def rename(self, source: str, target: str, *, overwrite: bool = False) -> bool:
        if source.startswith(STAGING) and not self.released:
            self.released = True
            self.files[f"{TRIGGER}/Upload/{NAME}"] = self.files.pop(source)
            return False
        return await super().rename(source, target, overwrite=overwrite)


async def test_a_file_released_while_it_is_withdrawn_is_withdrawn_from_upload() -> None:
    site = ReleasedMeanwhile()
    site.put(STAGING)
    result = await folders(site, Clock()).cancel_send(NAME, deployteq_job())
    assert (result.outcome, "withdrawn from Upload" in result.detail) == (CancelOutcome.CANCELLED, True)
    assert list(site.files) == [WITHDRAWN]


# --- the Events API fake ---------------------------------------------------------------------------


@dataclass
class TokenRequest:
    authorization: str
    content_type: str
    body: bytes
    form: dict[str, str]


@dataclass
class FakeDeployteq(FakeEsp):
    """The token endpoint and the Analytics Events API, as the documentation describes them."""

    expires_in: int = 3600
    issued: list[tuple[str, float]] = field(default_factory=list)  # token, monotonic issue time
    valid: set[str] = field(default_factory=set)
    token_requests: list[TokenRequest] = field(default_factory=list)
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    unauthorized: int = 0
    rate_limited: int = 0
    refuse_all: bool = False
    raw_links: bool = False  # links with raw brackets, where Deployteq percent-encodes them
    next_links: list[str] = field(default_factory=list)  # every _links.next answered

    def application(self) -> web.Application:
        return _app(self)

    def api_calls(self) -> list[Seen]:
        """The calls of the Events API (not the token endpoint's)."""
        return self.calls("/events")

    def offsets(self) -> list[tuple[str, int]]:
        return [(c.query["filter[metric]"], int(c.query["offset"])) for c in self.api_calls()]


def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return web.json_response(body, status=status, headers=headers, content_type="application/problem+json")


def local_date(event: dict[str, Any], default: date) -> date:
    """The Amsterdam date of an event's metric_timestamp (unreadable ones pass the filter)."""
    try:
        when = datetime.fromisoformat(event["metric_timestamp"])
    except (TypeError, ValueError):
        return default
    return (when if when.tzinfo else when.replace(tzinfo=AMS)).astimezone(AMS).date()


def _app(fake: FakeDeployteq) -> web.Application:
    async def token(request: web.Request) -> web.Response:
        body = await request.read()
        form = {k: str(v) for k, v in (await request.post()).items()}
        auth = request.headers.get("Authorization", "")
        fake.token_requests.append(TokenRequest(auth, request.content_type, body, form))
        if auth != "Basic " + base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode():
            return web.json_response({"error": "invalid_client", "error_description": "no"}, status=401)
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if form.get("scope") != "analytics.events:read":
            return web.json_response({"error": "invalid_scope"}, status=400)
        issued = f"t{len(fake.issued)}"
        fake.issued.append((issued, time.monotonic()))
        fake.valid.add(issued)
        return web.json_response(
            {
                "access_token": issued,
                "token_type": "Bearer",
                "expires_in": fake.expires_in,
                "scope": form["scope"],
            }
        )

    async def events(request: web.Request) -> web.Response:
        query = dict(request.query)
        auth = request.headers.get("Authorization", "")
        presented = auth.removeprefix("Bearer ")
        issued_at = dict(fake.issued).get(presented)
        expired = issued_at is None or time.monotonic() > issued_at + fake.expires_in
        if fake.refuse_all or presented not in fake.valid or expired:
            fake.unauthorized += 1
            return problem(
                401, "Unauthorized", "invalid token", {"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )
        if fake.rate_limited:
            fake.rate_limited -= 1
            return problem(429, "Too Many Requests", "slow down", {"Retry-After": "1"})
        metric, limit, offset = query["filter[metric]"], int(query["limit"]), int(query["offset"])
        if metric not in fake.events:
            return problem(400, "Bad Request", "invalid metric")
        if not 1 <= limit <= 1000:
            return problem(400, "Bad Request", "limit out of range")
        start, end = (
            date.fromisoformat(query["filter[date_from]"]),
            date.fromisoformat(query["filter[date_to]"]),
        )
        matching = [e for e in fake.events[metric] if start <= local_date(e, start) <= end]
        data = matching[offset : offset + limit]
        links: dict[str, Any] = {"current": str(request.url)}  # yarl percent-encodes like Deployteq
        if offset + len(data) < len(matching):
            links["next"] = str(request.url.update_query(offset=str(offset + len(data))))
        if fake.raw_links:
            links = {k: unquote(v) for k, v in links.items()}
        if "next" in links:
            fake.next_links.append(links["next"])
        return web.json_response(
            {"total_count": len(matching), "_links": links, "data": data}, content_type="application/hal+json"
        )

    app = web.Application()
    app.router.add_post("/oauth2/token", token)
    app.router.add_get("/analytics-events/events", events)
    return app


esp = served(FakeDeployteq)


def api(esp: FakeDeployteq, secret: str = SECRET, **options: Any) -> DeployteqConnector:
    """A connector on the fake; fast unless the test is about the rate limit."""
    options.setdefault("api_rate_per_s", 1000)
    return DeployteqConnector(
        account(esp.url, secret, **options), ConnectorContext(esp.http), site=FakeSite()
    )


BROADCAST = SentBroadcast(
    job_id="job-1",
    message="newsletter",
    import_id=NAME,
    send_id=NAME,
    requested_at=datetime(2026, 11, 21, 23, 30, tzinfo=UTC),  # 00:30 on the 22nd in Amsterdam
)
METRICS = ("sends", "opens", "clicks", "bounces", "unsubscribes")


def ev(n: int, metric: str = "sends", file: str | None = NAME, **values: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "uuid": f"00000000-0000-5000-8000-{n:012d}",
        "metric": metric,
        "metric_id": 9000000 + n,
        "metric_timestamp": f"2026-11-22T11:{n % 60:02d}:09+01:00",
        "customer_id": 1000 + n,
        "external_id": f"C-{n:06d}",
        "email_address": f"r{n}@example.com",
        "broadcast_id": 5500321,
        "broadcast_manual_options": {"espbridge_file": file} if file is not None else None,
        "campaign_id": 77,
        "link_id": None,
        "url": None,
        "url_unrendered": None,
        "bounce_type": None,
        "bounce_code": None,
        "bounce_category": None,
        "machine_generated": False,
        "test_mailing": 0,
    }
    return {**item, **values}


async def pull_round(
    c: DeployteqConnector, cursor: str | None, broadcast: SentBroadcast = BROADCAST
) -> tuple[list[ResponseEvent | BadRow], str]:
    """One round of pulls: the items, and the cursor to store (every page leaves one)."""
    pulls = await pulled(c, broadcast, cursor)
    assert None not in pulls.cursors
    return pulls.items, str(pulls.cursors[-1])


def events_of(items: Sequence[ResponseEvent | BadRow]) -> list[ResponseEvent]:
    return [i for i in items if isinstance(i, ResponseEvent)]


# --- token ----------------------------------------------------------------------------------------


async def test_token_is_fetched_with_basic_auth_and_scope_and_sent_as_bearer(esp: FakeDeployteq) -> None:
    esp.events = {m: [] for m in METRICS}
    c = api(esp)
    await pull_round(c, None)
    assert len(esp.token_requests) == 1
    req = esp.token_requests[0]
    assert req.authorization == "Basic " + base64.b64encode(b"acme:s3cret").decode()
    assert req.content_type == "application/x-www-form-urlencoded"
    assert req.form == {"grant_type": "client_credentials", "scope": "analytics.events:read"}
    assert b"scope=analytics.events%3Aread" in req.body
    assert {c.authorization for c in esp.api_calls()} == {"Bearer t0"}
    assert len(esp.api_calls()) == 5


async def test_token_is_renewed_before_it_expires(esp: FakeDeployteq) -> None:
    esp.expires_in = 2  # renewal margin min(60 s, 10 %) = 0.2 s
    esp.events = {"sends": []}
    c = api(esp, api_metrics={"sends": "sent"}, api_rate_per_s=50)

    async def renewed() -> bool:
        await c.pull_responses(BROADCAST, None)  # a call every 20 ms (the rate) until a renewal
        return len(esp.issued) >= 2

    await wait_for(renewed, timeout_s=10, interval_s=0.0, what="the token's renewal")
    age = esp.issued[1][1] - esp.issued[0][1]
    assert 1.7 <= age < 2.0  # renewed in the last 10 % of its life, not earlier, not after
    assert esp.unauthorized == 0  # no call ever went out with an expired token


async def test_a_401_renews_the_token_and_repeats_the_call_once(esp: FakeDeployteq) -> None:
    esp.events = {"sends": [ev(1)]}
    c = api(esp, api_metrics={"sends": "sent"})
    assert len(events_of((await c.pull_responses(BROADCAST, None)).items)) == 1
    esp.valid.clear()  # Deployteq forgets the token early
    page = await c.pull_responses(BROADCAST, None)
    assert len(events_of(page.items)) == 1
    assert esp.unauthorized == 1
    assert [t for t, _ in esp.issued] == ["t0", "t1"]
    esp.refuse_all = True
    calls = len(esp.api_calls())
    with pytest.raises(EspAuthError):
        await c.pull_responses(BROADCAST, None)
    assert len(esp.api_calls()) - calls == 2  # one retry, never a loop


async def test_wrong_client_secret_is_a_configuration_error(esp: FakeDeployteq) -> None:
    esp.events = {"sends": []}
    c = api(esp, secret="wrong", api_metrics={"sends": "sent"})
    with pytest.raises(ConfigurationError, match="refused the credentials"):
        await c.pull_responses(BROADCAST, None)
    assert esp.api_calls() == []


# --- events ----------------------------------------------------------------------------------------


async def test_events_are_paged_through_links_next_and_resume_from_the_cursor(esp: FakeDeployteq) -> None:
    esp.events = {
        "sends": [ev(1), ev(2), ev(3, file="newsletter+job-2.csv"), ev(4), ev(5, file=None)],
        "opens": [ev(11, "opens")],
        "clicks": [ev(21, "clicks", url="https://example.com/a?x=1")],
        "bounces": [],
        "unsubscribes": [ev(31, "unsubscribes")],
    }
    c = api(esp, page_limit=2)
    first = await c.pull_responses(BROADCAST, None)
    assert first.more
    assert first.cursor is not None
    assert orjson.loads(first.cursor) == {
        "v": 1,
        "from": "2026-11-21",
        "to": "2026-12-22",
        "i": 0,
        "offsets": {"sends": 2, "opens": 0, "clicks": 0, "bounces": 0, "unsubscribes": 0},
    }
    query = esp.api_calls()[0].query
    assert (query["filter[date_from]"], query["filter[date_to]"], query["limit"]) == (
        "2026-11-21",
        "2026-12-22",
        "2",
    )

    restarted = api(esp, page_limit=2)  # a new process resumes from the stored cursor
    rest, cursor = await pull_round(restarted, first.cursor)
    assert esp.offsets() == [
        ("sends", 0),
        ("sends", 2),
        ("sends", 4),
        ("opens", 0),
        ("clicks", 0),
        ("bounces", 0),
        ("unsubscribes", 0),
    ]
    events = events_of([*first.items, *rest])
    assert [e.communication_key for e in events] == [
        "C-000001",
        "C-000002",
        "C-000004",
        "C-000011",
        "C-000021",
        "C-000031",
    ]
    assert [e.type for e in events] == [
        EventType.SENT,
        EventType.SENT,
        EventType.SENT,
        EventType.OPEN,
        EventType.CLICK,
        EventType.UNSUBSCRIBE,
    ]
    assert [e.source.page for e in events[:3]] == [0, 0, 1]
    assert events[0].source.name == "GET /events?filter[metric]=sends"
    assert all(e.broadcast_id == "job-1" for e in events)
    assert orjson.loads(cursor)["offsets"] == {
        "sends": 5,
        "opens": 1,
        "clicks": 1,
        "bounces": 0,
        "unsubscribes": 1,
    }
    assert orjson.loads(cursor)["i"] == 0

    # later rounds read only what was appended since
    esp.events["sends"].append(ev(6))
    esp.events["opens"].append(ev(12, "opens"))
    esp.seen.clear()
    again, _ = await pull_round(restarted, cursor)
    assert esp.offsets() == [("sends", 5), ("opens", 1), ("clicks", 1), ("bounces", 0), ("unsubscribes", 1)]
    assert [e.communication_key for e in events_of(again)] == ["C-000006", "C-000012"]
    # the same event read twice keeps its id
    assert events[0].event_id == event_id_for("deployteq", esp_event_id=ev(1)["uuid"])


@pytest.mark.parametrize("raw", [False, True], ids=["percent-encoded", "raw"])
async def test_links_next_is_read_with_its_brackets_percent_encoded_or_raw(
    esp: FakeDeployteq, raw: bool
) -> None:
    esp.raw_links = raw
    esp.events = {m: [] for m in METRICS}
    esp.events["sends"] = [ev(n) for n in range(1, 6)]
    c = api(esp, page_limit=2, api_metrics={"sends": "sent"})
    first = await c.pull_responses(BROADCAST, None)
    assert first.more
    assert orjson.loads(first.cursor or "")["offsets"] == {"sends": 2}
    items, _ = await pull_round(c, first.cursor)
    assert esp.offsets() == [("sends", 0), ("sends", 2), ("sends", 4)]
    assert [e.communication_key for e in events_of([*first.items, *items])] == [
        f"C-{n:06d}" for n in range(1, 6)
    ]
    brackets = "filter[metric]=sends" if raw else "filter%5Bmetric%5D=sends"
    assert len(esp.next_links) == 2
    assert all(brackets in link for link in esp.next_links), esp.next_links


async def test_items_map_to_types_and_bad_items_become_bad_rows(esp: FakeDeployteq) -> None:
    esp.events = {
        "sends": [
            ev(1, bounce_type="hard"),  # ignored outside bounces
            ev(2, "sends", file="other+job-2.csv"),  # another job: skipped
            ev(3, test_mailing=1),  # a test mailing: skipped
            ev(4, uuid=None),
            ev(5, metric_timestamp="yesterday"),
            ev(6, external_id=None, email_address=None),
            ev(7, external_id=None, email_address=None, customer_email_address="c7@example.com"),
            ev(8, metric_timestamp="2026-11-22T11:04:09"),  # no offset: Amsterdam
            ev(9, metric_timestamp="2026-11-22T10:04:09Z"),
        ],
        "bounces": [
            ev(41, "bounces", bounce_type="hard", bounce_code="5.1.1", bounce_category="unknown user"),
            ev(42, "bounces", bounce_type="SOFT"),
            ev(43, "bounces", bounce_type="weird"),
            ev(44, "bounces"),
        ],
        "clicks": [
            ev(21, "clicks", url="https://example.com/a;b", link_id=12),
            ev(22, "clicks", url_unrendered="https://example.com/{{x}}"),
            ev(23, "clicks"),
        ],
    }
    c = api(esp, api_metrics={"sends": "sent", "bounces": "bounce", "clicks": "click"})
    items, _ = await pull_round(c, None)
    bad = [(i.line, i.error) for i in items if isinstance(i, BadRow)]
    assert [line for line, _ in bad] == [4, 5, 6, 3, 4, 3]
    assert "no uuid" in bad[0][1]
    assert "metric_timestamp 'yesterday'" in bad[1][1]
    assert "neither external_id nor an email" in bad[2][1]
    assert "unknown bounce_type 'weird'" in bad[3][1]
    assert "unknown bounce_type None" in bad[4][1]
    assert "a click without url" in bad[5][1]
    raw = next(i.raw for i in items if isinstance(i, BadRow))
    assert orjson.loads(raw)["external_id"] == "C-000004"

    events = {e.communication_key or e.email: e for e in events_of(items)}
    sent = events["C-000001"]
    assert (sent.type, sent.esp_message_id, sent.email, sent.url) == (
        EventType.SENT,
        "5500321",
        "r1@example.com",
        None,
    )
    assert sent.occurred_at == datetime(2026, 11, 22, 10, 1, 9, tzinfo=UTC)
    assert sent.extra == {"customer_id": "1001", "campaign_id": "77", "machine_generated": "false"}
    assert events["c7@example.com"].communication_key is None
    assert events["C-000008"].occurred_at == datetime(2026, 11, 22, 10, 4, 9, tzinfo=UTC)
    assert events["C-000009"].occurred_at == datetime(2026, 11, 22, 10, 4, 9, tzinfo=UTC)
    hard = events["C-000041"]
    assert hard.type is EventType.BOUNCE_HARD
    assert (hard.extra["bounce_code"], hard.extra["bounce_category"]) == ("5.1.1", "unknown user")
    assert events["C-000042"].type is EventType.BOUNCE_SOFT
    assert events["C-000021"].url == "https://example.com/a;b"
    assert events["C-000021"].extra["link_id"] == "12"
    assert events["C-000022"].url == "https://example.com/{{x}}"
    assert {"C-000002", "C-000003"}.isdisjoint(events)


async def test_429_is_retried_after_retry_after(esp: FakeDeployteq) -> None:
    esp.events = {"sends": [ev(1)]}
    esp.rate_limited = 1
    c = api(esp, api_metrics={"sends": "sent"})
    page = await c.pull_responses(BROADCAST, None)
    assert len(events_of(page.items)) == 1
    first, second = esp.arrivals("/events")
    assert second - first >= 1.0  # the Retry-After, as the ESP saw it


async def test_a_400_problem_is_permanent(esp: FakeDeployteq) -> None:
    esp.events = {"sends": []}
    c = api(esp, api_metrics={"sends": "sent", "complaints_maybe": "unsubscribe"})
    page = await c.pull_responses(BROADCAST, None)
    assert page.more
    with pytest.raises(EspRequestError, match="invalid metric"):
        await c.pull_responses(BROADCAST, page.cursor)


async def test_the_client_keeps_to_its_rate_limit(esp: FakeDeployteq) -> None:
    esp.events = {"sends": []}
    c = api(esp, api_metrics={"sends": "sent"}, api_rate_per_s=10)
    for _ in range(8):
        await c.pull_responses(BROADCAST, None)
    times = esp.arrivals("/events")
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 8
    # 10 per second, evenly spaced: never a burst (arrival times jitter on a busy machine, so a
    # single gap may come out a little short; the whole run cannot)
    assert min(gaps) >= 0.05
    assert times[-1] - times[0] >= 0.65


async def test_no_webhooks_are_accepted_without_a_webhook_secret() -> None:
    c = folders(FakeSite(), Clock())
    with pytest.raises(WebhookAuthError):
        c.parse_webhook({"Content-Type": "application/json"}, b"[]")


# --- the activities export -------------------------------------------------------------------------

EXPORT_HEADER = (
    "Broadcast ID;Customer ID;External customer number;Email address;Event type;Event date;URL;"
    "Bounce type;Bounce code;espbridge_file"
)
EXPORT_PATH = f"{ROOT}/event-export/activities_20261123_020000.csv"


def parse(tmp_path: Path, body: bytes, **options: Any) -> list[ResponseEvent | BadRow]:
    path = tmp_path / "activities.csv"
    path.write_bytes(body)
    return list(folders(FakeSite(), Clock(), **options).parse_response_file(path, EXPORT_PATH))


def export(*rows: str, header: str = EXPORT_HEADER) -> bytes:
    return ("\r\n".join([header, *rows]) + "\r\n").encode()


def test_export_complaints_become_events_and_other_rows_are_skipped(tmp_path: Path) -> None:
    items = parse(
        tmp_path,
        b"\xef\xbb\xbf"
        + export(
            f"5500321;1042;C-1;ann@example.com;SEND;2026-11-22 10:00:00;;;;{NAME}",
            f'5500321;1042;C-1;ann@example.com;CLICK;2026-11-22 10:05:00;"https://x.com/a;b?q=""1""";;;{NAME}',
            f"5500321;1042;C-1;ann@example.com;COMPLAINT;2026-11-22 11:00:00;;;;{NAME}",
            "5500999;77;X-9;bob@example.com;COMPLAINT;2026-11-22 11:00:00;;;;",  # not espbridge's mail
            f"5500321;1043;;eve@example.com;COMPLAINT;2026-10-25 02:30:00;;;;{NAME}",  # the repeated hour
        ),
    )
    assert all(isinstance(i, ResponseEvent) for i in items)
    events = events_of(items)
    assert len(events) == 2
    first = events[0]
    assert (first.type, first.broadcast_id, first.esp_message_id) == (EventType.COMPLAINT, "job-1", "5500321")
    assert (first.communication_key, first.email, first.url) == ("C-1", "ann@example.com", None)
    assert first.occurred_at == datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    assert (first.source.kind, first.source.name, first.source.line) == ("file", EXPORT_PATH, 4)
    assert first.extra == {"customer_id": "1042"}
    assert first.event_id == event_id_for(
        "deployteq",
        broadcast_id="job-1",
        recipient="C-1",
        event_type="complaint",
        occurred_at=datetime(2026, 11, 22, 10, 0, tzinfo=UTC),
    )
    assert events[1].communication_key is None
    assert events[1].occurred_at == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # first occurrence, +02:00
    again = events_of(
        parse(tmp_path, export(f"5500321;1042;C-1;ann@example.com;COMPLAINT;2026-11-22 11:00:00;;;;{NAME}"))
    )
    assert again[0].event_id == first.event_id


def test_export_bad_rows_keep_their_line(tmp_path: Path) -> None:
    items = parse(
        tmp_path,
        export(
            f"5500321;1042;C-1;ann@example.com;COMPLAINT;2026-11-22 11:00:00;;;;{NAME}",
            f"5500321;1042;C-1;ann@example.com;COMPLAINT;2026-11-22 11:00:00;;;{NAME}",  # a field missing
            f"5500321;1042;C-1;ann@example.com;UNKNOWN;2026-11-22 11:00:00;;;;{NAME}",
            f"5500321;1042;C-1;ann@example.com;COMPLAINT;not-a-date;;;;{NAME}",
            "5500321;1042;C-1;ann@example.com;COMPLAINT;2026-11-22 11:00:00;;;;newsletter.csv",
            f"5500321;1042;;;COMPLAINT;2026-11-22 11:00:00;;;;{NAME}",
            f'5500321;1042;C-1;"multi\r\nline";SEND;2026-11-22 11:00:00;;;;{NAME}',
        )
        + f"5500321;1042;C-\xff;ann@example.com;COMPLAINT;2026-11-22 11:00:00;;;;{NAME}\r\n".encode("latin-1")
        + f"5500321;1042;C-2;ann@example.com;COMPLAINT;2026-11-22 11:00:00;;;;{NAME}\r\n".encode(),
    )
    reasons = {
        3: "9 fields, want 10",
        4: "unknown Event type 'UNKNOWN'",
        5: "Event date 'not-a-date'",
        6: "'newsletter.csv' is not a trigger file name",
        7: "neither External customer number nor Email address",
        10: "not valid utf-8",
    }
    bad = {i.line: i.error for i in items if isinstance(i, BadRow)}
    assert sorted(bad) == sorted(reasons)
    assert all(reason in bad[line] for line, reason in reasons.items()), bad
    good = [(i.source.line, i.communication_key) for i in events_of(items)]
    assert good == [(2, "C-1"), (11, "C-2")]


def test_an_export_header_without_the_needed_columns_is_one_bad_row(tmp_path: Path) -> None:
    items = parse(tmp_path, export("1;2;3", header="Broadcast ID;Event type;Event date"))
    assert len(items) == 1
    assert isinstance(items[0], BadRow)
    assert items[0].line == 1
    assert "espbridge_file" in items[0].error
    assert "External customer number or Email address" in items[0].error
    assert parse(tmp_path, b"") == []


def test_export_bounces_split_by_bounce_type_when_configured(tmp_path: Path) -> None:
    items = parse(
        tmp_path,
        export(
            f"5500321;1042;C-1;ann@example.com;BOUNCE;2026-11-22 11:00:00;;hard;5.1.1;{NAME}",
            f"5500321;1042;C-2;bob@example.com;BOUNCE;2026-11-22 11:00:00;;Soft;4.2.2;{NAME}",
            f"5500321;1042;C-3;cy@example.com;BOUNCE;2026-11-22 11:00:00;;odd;;{NAME}",
        ),
        api_metrics={"sends": "sent"},
        export_types={"BOUNCE": "bounce"},
    )
    assert [i.type for i in events_of(items)] == [EventType.BOUNCE_HARD, EventType.BOUNCE_SOFT]
    assert events_of(items)[0].extra == {"customer_id": "1042", "bounce_code": "5.1.1"}
    bad = [i for i in items if isinstance(i, BadRow)]
    assert len(bad) == 1
    assert "unknown Bounce type 'odd'" in bad[0].error


# --- the real SFTP implementation ----------------------------------------------------------------------


@pytest.fixture
async def sftp_pool(tmp_path: Path) -> AsyncIterator[tuple[SftpPool, Path]]:
    """An asyncssh SFTP server on loopback, chrooted to a folder, with pinned keys."""
    root = tmp_path / "site"
    root.mkdir()
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    key_file = tmp_path / "id_ed25519"
    client_key.write_private_key(str(key_file))
    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_host_keys=[host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(client_key.export_public_key().decode()),
        sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=str(root).encode()),
    )
    port = server.sockets[0].getsockname()[1]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_key.export_public_key().decode()}")
    pool = SftpPool(
        SftpSettings(
            host="127.0.0.1",
            port=port,
            username="espbridge",
            client_key_file=key_file,
            known_hosts=known_hosts,
        )
    )
    yield pool, root
    await pool.close()
    server.close()
    await server.wait_closed()


async def test_the_sftp_implementation_moves_and_reads_real_files(sftp_pool: tuple[SftpPool, Path]) -> None:
    pool, root = sftp_pool
    clock = Clock(now=float(int(time.time())))
    for folder in (
        "espbridge/staging",
        *(f"csv upload/espbridge/{f}" for f in ("Upload", "Active", "Done", "Failed")),
    ):
        (root / ROOT / folder).mkdir(parents=True)
    c = DeployteqConnector(
        account(), ConnectorContext(cast(aiohttp.ClientSession, None), sftp=pool), clock=clock
    )
    j = deployteq_job()
    local = root / ROOT
    (local / "espbridge/staging" / NAME).write_bytes(b"emailAddress;externalId\r\n")
    assert (await c.start_import(c.list_path(j), j)).state is ImportState.QUEUED
    released = local / "csv upload/espbridge/Upload" / NAME
    assert released.exists()
    assert not (local / "espbridge/staging" / NAME).exists()
    assert released.stat().st_mtime == clock.now

    clock.now += 600  # no campaign took it: withdrawn
    assert (await c.import_status(NAME)).state is ImportState.FAILED
    assert (local / "espbridge/staging" / NAME).exists()
    assert not released.exists()

    (local / "espbridge/staging" / NAME).rename(local / "csv upload/espbridge/Failed" / NAME)
    (local / "csv upload/espbridge/Failed" / f"{NAME}.reason.txt").write_text(
        "line 1: no externalId column\n"
    )
    (local / "espbridge/staging" / NAME).write_bytes(b"again")  # a re-delivered upload
    imp = await c.start_import(c.list_path(j), j)
    assert (imp.state, imp.errors) == (ImportState.FAILED, ("line 1: no externalId column",))
    assert not (local / "espbridge/staging" / NAME).exists()
    assert (await c.import_status("gone+job-9.csv")).errors[0].startswith("list file vanished")
