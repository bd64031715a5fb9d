"""The sandbox ESP's ``deployteq`` flavor as a client sees it (docs/connectors/deployteq.md).

A real ``python -m sandbox`` process; the tests only drop files on its SFTP tree, read the files it
writes, and speak HTTP to it (OAuth2 token endpoint, Analytics Events API). No espbridge code.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import orjson
from yarl import URL

from tests.fixtures.sandbox import BUSY_RATES, EVENT_TYPES, SandboxClient, Sandboxes, basic
from tests.fixtures.waits import wait_for

FLAVOR = "deployteq"
METRICS = ("sends", "bounces", "opens", "clicks", "unsubscribes")
SCOPE = "analytics.events:read"
# The export's columns as docs/connectors/deployteq.md documents them, written out here.
ACTIVITY_COLUMNS = [
    "Broadcast ID",
    "Customer ID",
    "External customer number",
    "Email address",
    "Event type",
    "Event date",
    "URL",
    "Bounce type",
    "Bounce code",
    "espbridge_file",
]
BROADCAST_COLUMNS = [
    "Broadcast ID",
    "Broadcast date",
    "Campaign ID",
    "Campaign name",
    "Campaign object ID",
    "Email ID",
    "Email name",
    "Subject",
]
AMSTERDAM = ZoneInfo("Europe/Amsterdam")
EXPORT_TIME_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")
TREE = "csv upload/espbridge"


# Helpers


def people(n: int) -> list[list[str]]:
    """``n`` list rows (emailAddress, externalId, firstName); some names need quoting."""
    return [
        [f"p{i}@example.com", f"C-{i:05d}", f'Ann; "{i}"' if i % 10 == 0 else f"Ann {i}"] for i in range(n)
    ]


def list_text(
    rows: list[list[str]], header: tuple[str, ...] = ("emailAddress", "externalId", "firstName")
) -> str:
    """A list file as the doc has it: ``;``, CRLF, RFC 4180 minimal quoting."""
    out = io.StringIO()
    writer = csv.writer(out, delimiter=";", lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def drop(esp: SandboxClient, name: str, data: bytes) -> None:
    """Upload to staging, then rename into ``Upload/`` (as the connector releases a file)."""
    staged = esp.account_dir() / "espbridge/staging" / name
    staged.write_bytes(data)
    staged.rename(esp.account_dir() / TREE / "Upload" / name)


def where(esp: SandboxClient, name: str) -> list[str]:
    """The trigger folders holding ``name``."""
    return [
        s for s in ("Upload", "Active", "Done", "Failed") if (esp.account_dir() / TREE / s / name).is_file()
    ]


def offset_of(link: str) -> int:
    return int(parse_qs(urlsplit(link).query)["offset"][0])


class Client:
    """The OAuth2 token endpoint and the Events API of one account."""

    def __init__(self, esp: SandboxClient, account: str | None = None) -> None:
        self.http = esp.http
        self.esp = esp
        self.account = account or esp.account
        self.base = f"{esp.url}/deployteq/{self.account}"
        self.api = f"{self.base}/analytics-events"
        self.access: str | None = None

    async def token(
        self, headers: dict[str, str] | None, form: dict[str, str] | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        data = {"grant_type": "client_credentials", "scope": SCOPE} if form is None else form
        async with self.http.post(f"{self.base}/oauth2/token", headers=headers or {}, data=data) as resp:
            return resp.status, orjson.loads(await resp.read()), dict(resp.headers)

    async def new_token(self) -> str:
        status, body, _ = await self.token(basic(self.account, self.esp.token))
        assert status == 200, body
        token: str = body["access_token"]
        self.access = token
        return token

    async def get(
        self, url: str | URL, token: str | None = None, **params: str
    ) -> tuple[int, Any, dict[str, str]]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with self.http.get(url, params=params or None, headers=headers) as resp:
            return resp.status, orjson.loads(await resp.read()), dict(resp.headers)

    async def events(self, url: str | URL | None = None, **params: str) -> Any:
        """A 200 page (a new token once after a 401, as the connector does)."""
        for _ in range(2):
            token = self.access or await self.new_token()
            status, body, _ = await self.get(url or f"{self.api}/events", token, **params)
            if status != 401:
                assert status == 200, (status, body)
                return body
            self.access = None
        raise AssertionError("401 twice")

    async def all_events(self, metric: str | None, limit: int = 25, **filters: str) -> list[dict[str, Any]]:
        """Every event of a metric (of every metric with None), following ``_links.next`` as given
        (its brackets percent-encoded, as Deployteq's)."""
        if metric is not None:
            filters["filter[metric]"] = metric
        body = await self.events(**{"limit": str(limit), "offset": "0"}, **filters)
        items: list[dict[str, Any]] = []
        total, offset = body["total_count"], 0
        while True:
            assert offset_of(body["_links"]["current"]) == offset
            assert len(body["data"]) <= limit
            assert body["total_count"] == total
            items += body["data"]
            next_link = body["_links"].get("next")
            if next_link is None:
                assert offset + len(body["data"]) == total
                return items
            assert len(body["data"]) == limit
            assert "[" not in next_link  # percent-encoded (parse_qs below decodes them)
            assert parse_qs(urlsplit(next_link).query).get("filter[metric]") == ([metric] if metric else None)
            offset += len(body["data"])
            assert offset_of(next_link) == offset
            body = await self.events(URL(next_link, encoded=True))

    async def stats(self, token: str | None = None) -> dict[str, Any]:
        status, body, _ = await self.get(f"{self.api}/_sandbox/stats", token or self.esp.token)
        assert status == 200, body
        stats: dict[str, Any] = body
        return stats


def assert_problem(status: int, body: Any, headers: dict[str, str], expected: int) -> None:
    assert status == expected, (status, body)
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["status"] == expected
    assert body["type"] == "about:blank"
    assert isinstance(body["title"], str)
    assert isinstance(body["detail"], str)


def api_counts(items_by_metric: dict[str, list[dict[str, Any]]], file: str) -> Counter[str]:
    """The espbridge types of a job's API events (``espbridge_file`` = its file)."""
    counts: Counter[str] = Counter()
    for metric, items in items_by_metric.items():
        for item in items:
            if (item["broadcast_manual_options"] or {}).get("espbridge_file") != file:
                continue
            if metric == "bounces":
                counts[f"bounce_{item['bounce_type']}"] += 1
            else:
                counts[
                    {"sends": "sent", "opens": "open", "clicks": "click", "unsubscribes": "unsubscribe"}[
                        metric
                    ]
                ] += 1
    return counts


def read_export(path: Path) -> list[list[str]]:
    """An export file's rows (header first), checking its format: UTF-8 without BOM, CRLF."""
    data = path.read_bytes()
    assert not data.startswith(b"\xef\xbb\xbf")
    assert data.endswith(b"\r\n")
    text = data.decode("utf-8")
    return list(csv.reader(io.StringIO(text, newline=""), delimiter=";", strict=True))


def malformed_kind(row: list[str]) -> int | None:
    """0: a field short; 1: ``UNKNOWN``; 2: a complaint dated ``not-a-date``; None: well-formed."""
    if len(row) != len(ACTIVITY_COLUMNS):
        return 0
    if row[4] == "UNKNOWN":
        return 1
    if row[5] == "not-a-date":
        return 2
    return None


# Tests


async def test_tokens_expire_and_the_events_api_is_rate_limited(sandbox: Sandboxes) -> None:
    settings = {
        "accounts": "demo,other",
        "token_ttl_s": "1",
        "api_limit_per_s": "1",
        "api_limit_burst": "2",
    }
    with sandbox(FLAVOR, **settings) as esp:
        client = Client(esp)
        # Client authentication (Basic client_id:secret), then grant_type and scope (RFC 6749 §5.2).
        for headers in [None, basic("demo", "wrong"), basic("other", esp.token), basic("nobody", esp.token)]:
            status, body, resp_headers = await client.token(headers)
            assert (status, body["error"]) == (401, "invalid_client"), headers
            assert "Basic" in resp_headers["WWW-Authenticate"]
        good = basic("demo", esp.token)
        for form, error in [
            ({"scope": SCOPE}, "invalid_request"),
            ({"grant_type": "password", "scope": SCOPE}, "unsupported_grant_type"),
            ({"grant_type": "client_credentials", "scope": "analytics.events:write"}, "invalid_scope"),
        ]:
            status, body, _ = await client.token(good, form)
            assert (status, body["error"]) == (400, error), form
            assert isinstance(body["error_description"], str)
        status, body, _ = await Client(esp, "nobody").token(basic("nobody", esp.token))
        assert status == 404

        status, body, headers = await client.token(good)
        assert status == 200, body
        assert headers["Content-Type"].startswith("application/json")
        assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
        assert (body["token_type"], body["expires_in"], body["scope"]) == ("Bearer", 1, SCOPE)
        access = body["access_token"]

        # A missing, unknown or foreign token: 401 with WWW-Authenticate and a problem body.
        _, other_body, _ = await Client(esp, "other").token(basic("other", esp.token))
        for token in [None, "nonsense", esp.token, other_body["access_token"]]:
            status, body, headers = await client.get(
                f"{client.api}/events", token, **{"filter[metric]": "sends"}
            )
            assert_problem(status, body, headers, 401)
            assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'

        # Over the limit: real 429s with Retry-After and a problem body; refused calls take no token.
        access = await client.new_token()
        answers = await asyncio.gather(
            *(client.get(f"{client.api}/events", access, **{"filter[metric]": "sends"}) for _ in range(6))
        )
        statuses = Counter(status for status, _, _ in answers)
        assert statuses[200] == 2
        assert statuses[429] == 4
        for status, body, headers in answers:
            if status == 429:
                assert_problem(status, body, headers, 429)
                assert int(headers["Retry-After"]) >= 1
            else:
                assert body["data"] == []
                assert body["total_count"] == 0
                assert "next" not in body["_links"]
        # Stats are not rate-limited, and take the sandbox token or an access token.
        for _ in range(5):
            stats = await client.stats()
        assert stats == {"sends_created": {}, "tokens_issued": 2, "rate_limited": 4}
        assert (await Client(esp, "other").stats())["tokens_issued"] == 1
        assert (await client.stats(access))["rate_limited"] == 4

        # The token expires after TOKEN_TTL_S: then 401 (before the rate limit is consulted).
        async def expired() -> bool | None:
            status, _, _ = await client.get(f"{client.api}/_sandbox/stats", access)
            return True if status == 401 else None

        await wait_for(expired, 5.0, 0.01, what="the access token to expire")
        status, body, headers = await client.get(
            f"{client.api}/events", access, **{"filter[metric]": "sends"}
        )
        assert_problem(status, body, headers, 401)
        assert (await client.stats())["rate_limited"] == 4


async def test_trigger_files_events_and_export_match_the_manifest(sandbox: Sandboxes) -> None:
    settings = {
        **BUSY_RATES,
        "campaigns": "newsletter,promo",
        "import_delay_s": "0.3",
        "phase_delay_s": "0.1",
        "rows_per_file": "40",
        "export_interval_s": "1",
        "malformed_every": "7",
        "foreign_every": "5",
    }
    with sandbox(FLAVOR, **settings) as esp:
        client = Client(esp)
        account = esp.account_dir()
        for folder in [*(f"{TREE}/{s}" for s in ("Upload", "Active", "Done", "Failed")), "espbridge/staging"]:
            assert (account / folder).is_dir(), folder
        for folder in ["event-export", "event-export/archive", "manifest"]:
            assert (account / folder).is_dir(), folder

        # A good file: Upload -> Active -> Done.
        rows = people(150)
        rows += [
            ["no-at-sign.example.com", "S-1", "x"],
            ["", "S-2", "x"],
            ["nokey@example.com", "", "x"],
            ["again@example.com", "C-00001", "x"],
        ]
        name = "newsletter+job-1.csv"
        drop(esp, name, list_text(rows).encode())
        seen: list[str] = []

        async def done() -> bool | None:
            now = where(esp, name)
            if now and (not seen or seen[-1] != now[0]):
                seen.append(now[0])
            return True if now == ["Done"] else None

        await wait_for(done, 10.0, 0.01, what=f"{name} in Done")
        assert seen[-2:] == ["Active", "Done"], seen
        assert "Failed" not in seen
        assert (await client.stats())["sends_created"] == {"job-1": 1}

        # The file's customers are opted in on optin (an unsubscribe has a row to change).
        async def opted_in() -> list[dict[str, Any]] | None:
            url = f"{esp.api()}/_sandbox/contacts"
            async with esp.http.get(url, params={"list": "optin"}, headers=esp.headers) as resp:
                found: list[dict[str, Any]] = (await resp.json())["contacts"]
            return found if len(found) >= 150 else None

        members = await wait_for(opted_in, 10.0, 0.02, what="the file's customers on optin")
        assert (len(members), {m["state"] for m in members}) == (150, {"subscribed"})

        # A trigger that selects no campaign stays; rejected files go to Failed with no reason file
        # beside them (Deployteq gives the reason only in its notification e-mail): the reasons are
        # in the sandbox's manifest.
        drop(esp, "other+job-3.csv", list_text(people(3)).encode())
        drop(esp, "promo+job-2.csv", list_text(people(3), ("email", "externalId", "firstName")).encode())
        drop(esp, "newsletter+job-4.csv", list_text([*people(2), ["x@example.com", "only-two"]]).encode())
        drop(esp, "newsletter+job-5.csv", list_text(people(2)).encode() + b"bad\xff@example.com;K;x\r\n")
        drop(esp, "newsletter+job-6.csv", list_text([]).encode())
        reasons = {
            "promo+job-2.csv": "line 1: missing column emailAddress",
            "newsletter+job-4.csv": "line 4: expected 3 fields, found 2",
            "newsletter+job-5.csv": "line 4: not valid UTF-8",
            "newsletter+job-6.csv": "line 2: no rows",
        }
        for failed_name, reason in reasons.items():

            async def failed(file: str = failed_name) -> bool | None:
                return True if where(esp, file) == ["Failed"] else None

            await wait_for(failed, 10.0, 0.01, what=f"{failed_name} in Failed")
            job_id = failed_name.split("+")[1].removesuffix(".csv")
            body = esp.manifest(job_id)
            assert body is not None
            assert body["complete"] is True
            assert body["failed"] == [reason]
            assert set(body["counts"].values()) == {0}
            assert body["file"] == f"{TREE}/Failed/{failed_name}"
        # The later files were taken while other+job-3.csv lay in Upload the whole time.
        assert where(esp, "other+job-3.csv") == ["Upload"]
        assert sorted(p.name for p in (account / TREE / "Failed").iterdir()) == sorted(reasons)
        assert esp.manifest("job-3") is None
        assert (await client.stats())["sends_created"] == {"job-1": 1}

        body = await esp.complete_manifest("job-1")
        assert body["broadcast_id"] == "job-1"
        assert body["deployteq_broadcast_id"] == 5000001
        assert body["file"] == f"{TREE}/Done/{name}"
        assert (body["recipients"], body["rows_skipped"]) == (150, 4)
        assert body["sources"] == {
            "api": ["sent", "bounce_hard", "bounce_soft", "open", "click", "unsubscribe"],
            "export": ["complaint"],
        }
        assert list(body["counts"]) == list(EVENT_TYPES)
        assert body["counts"]["delivered"] == 0

        # The Events API: every metric paged through _links.next.
        by_metric = {m: await client.all_events(m) for m in METRICS}
        uuids = [item["uuid"] for items in by_metric.values() for item in items]
        assert len(uuids) == len(set(uuids))
        foreign = 0
        for metric, items in by_metric.items():
            ids = [item["metric_id"] for item in items]
            assert ids == sorted(ids)
            assert len(ids) == len(set(ids))
            for item in items:
                assert item["metric"] == metric
                assert datetime.fromisoformat(item["metric_timestamp"]).utcoffset() is not None
                options = item["broadcast_manual_options"]
                if not options:
                    foreign += 1
                    continue
                assert options == {"espbridge_file": name}
                assert item["broadcast_id"] == 5000001
                assert item["external_id"].startswith("C-")
                assert item["email_address"].endswith("@example.com")
                assert item["test_mailing"] == 0
                if metric == "bounces":
                    assert item["bounce_type"] in ("hard", "soft")
                if metric == "clicks":
                    assert item["url"]
                else:
                    assert item["url"] is None
        assert foreign > 0
        urls = {item["url"] for item in by_metric["clicks"]}
        assert any(";" in url for url in urls)
        assert any('"' in url for url in urls)
        counts = api_counts(by_metric, name)
        assert counts["sent"] == 150
        # Without filter[metric]: every metric's events together, in metric_id order.
        every = await client.all_events(None, limit=100)
        by_id = sorted((item for items in by_metric.values() for item in items), key=lambda i: i["metric_id"])
        assert every == by_id

        # Date filters: inclusive local dates of metric_timestamp; brackets percent-encoded in the
        # request here and in the links.
        days = sorted(
            {
                datetime.fromisoformat(i["metric_timestamp"]).astimezone(AMSTERDAM).date().isoformat()
                for i in by_metric["opens"]
            }
        )
        page = await client.events(
            **{
                "filter[metric]": "opens",
                "filter[date_from]": days[0],
                "filter[date_to]": days[-1],
                "limit": "1000",
            }
        )
        assert page["total_count"] == len(by_metric["opens"])
        assert "filter%5Bdate_from%5D=" + days[0] in page["_links"]["current"]
        page = await client.events(
            **{"filter[metric]": "opens", "filter[date_from]": days[-1], "filter[date_to]": days[-1]}
        )
        on_last_day = [i for i in by_metric["opens"] if i["metric_timestamp"].startswith(days[-1])]
        assert page["total_count"] == len(on_last_day)
        page = await client.events(
            **{"filter[metric]": "sends", "filter[date_from]": "2000-01-01", "filter[date_to]": "2000-01-31"}
        )
        assert (page["total_count"], page["data"], page["_links"].get("next")) == (0, [], None)
        page = await client.events(**{"filter[metric]": "sends", "offset": "100000"})
        assert page["data"] == []
        assert "next" not in page["_links"]
        for params in [
            {"filter[metric]": "complaints"},
            {"filter[metric]": "sends", "limit": "0"},
            {"filter[metric]": "sends", "limit": "1001"},
            {"filter[metric]": "sends", "offset": "-1"},
            {"filter[metric]": "sends", "filter[date_from]": "2026-13-01"},
            {"filter[metric]": ""},
        ]:
            status, body, headers = await client.get(f"{client.api}/events", client.access, **params)
            assert_problem(status, body, headers, 400)

        # The export: activities files with SEND/BOUNCE/OPEN/CLICK/COMPLAINT rows, injections.
        final = esp.manifest("job-1")
        assert final is not None
        export = account / "event-export"
        activities = sorted(export.glob("activities_*.csv"))
        assert [f"event-export/{p.name}" for p in activities] == final["files"]
        exported: Counter[str] = Counter()
        complaints = good = malformed = foreign_rows = 0
        kinds: list[int] = []
        expect_malformed = expect_foreign = False
        for path in activities:
            assert re.fullmatch(r"activities_\d{8}_\d{6}\.csv", path.name)
            table = read_export(path)
            assert table[0] == ACTIVITY_COLUMNS
            broadcasts = read_export(export / path.name.replace("activities_", "broadcasts_"))
            assert broadcasts[0] == BROADCAST_COLUMNS
            assert "5000001" in [r[0] for r in broadcasts[1:]]
            for row in table[1:]:
                kind = malformed_kind(row)
                if expect_malformed:
                    assert kind is not None, row
                    expect_malformed = False
                    malformed += 1
                    kinds.append(kind)
                    assert row[-1] == name
                    continue
                assert kind is None, row
                if expect_foreign:
                    assert (row[4], row[-1]) == ("COMPLAINT", "")
                    assert EXPORT_TIME_RE.fullmatch(row[5])
                    expect_foreign = False
                    foreign_rows += 1
                    continue
                assert row[-1] == name
                assert row[0] == "5000001"
                assert EXPORT_TIME_RE.fullmatch(row[5])
                assert row[4] in ("SEND", "BOUNCE", "OPEN", "CLICK", "COMPLAINT")
                assert bool(row[6]) == (row[4] == "CLICK")
                assert (row[7] in ("hard", "soft")) == (row[4] == "BOUNCE")
                exported[row[4]] += 1
                complaints += row[4] == "COMPLAINT"
                good += 1
                expect_malformed, expect_foreign = good % 7 == 0, good % 5 == 0
        assert not expect_malformed
        assert not expect_foreign
        assert kinds == [k % 3 for k in range(len(kinds))]
        assert malformed == final["malformed"] == good // 7
        assert foreign_rows == good // 5
        assert complaints > 0
        # Export rows of API types mirror the API events.
        assert exported["SEND"] == counts["sent"]
        assert exported["BOUNCE"] == counts["bounce_hard"] + counts["bounce_soft"]
        assert exported["OPEN"] == counts["open"]
        assert exported["CLICK"] == counts["click"]

        # The manifest counts each event once, by the source of its type.
        assert final["counts"] == {**{t: 0 for t in EVENT_TYPES}, **counts, "complaint": complaints}

        # The same file dropped again is not sent again.
        drop(esp, name, list_text(rows).encode())

        async def refused() -> bool | None:
            return True if "Upload" not in where(esp, name) and "Failed" in where(esp, name) else None

        await wait_for(refused, 10.0, 0.01, what="the repeated file to be refused")
        assert where(esp, name) == ["Done", "Failed"]
        assert not (account / TREE / "Failed" / f"{name}.reason.txt").exists()
        assert (await client.stats())["sends_created"] == {"job-1": 1}
        assert esp.manifest("job-1") == final
        assert len(await client.all_events("sends", limit=1000)) == len(by_metric["sends"])


async def test_a_restart_midway_releases_and_exports_each_event_once(sandbox: Sandboxes) -> None:
    settings = {
        **BUSY_RATES,
        "rows_per_file": "15",
        "phase_delay_s": "0.4",
        "export_interval_s": "1",
        "malformed_every": "6",
        "foreign_every": "4",
    }
    name = "newsletter+job-1.csv"
    with sandbox(FLAVOR, **settings) as esp:
        drop(esp, name, list_text(people(120)).encode())

        async def some_released() -> bool | None:
            body = esp.manifest("job-1")
            return True if body is not None and body["counts"]["sent"] > 0 else None

        await wait_for(some_released, 10.0, 0.01, what="the first events")
        old_token = await Client(esp).new_token()
        assert esp.stop() == 0
        stopped = esp.manifest("job-1")
        assert stopped is not None
        assert not stopped["complete"]

    with sandbox(FLAVOR, root=esp.root, token=esp.token, **settings) as esp:
        client = Client(esp)
        status, _, _ = await client.get(f"{client.api}/events", old_token, **{"filter[metric]": "sends"})
        assert status == 401, "tokens live in memory: a restarted sandbox wants a new one"
        final = await esp.complete_manifest("job-1")
        by_metric = {m: await client.all_events(m, limit=1000) for m in METRICS}
        uuids = [item["uuid"] for items in by_metric.values() for item in items]
        assert len(uuids) == len(set(uuids))
        ids = [item["metric_id"] for items in by_metric.values() for item in items]
        assert sorted(ids) == list(range(1, len(ids) + 1))
        counts = api_counts(by_metric, name)
        assert counts["sent"] == 120

        rows = [
            row
            for path in sorted((esp.account_dir() / "event-export").glob("activities_*.csv"))
            for row in read_export(path)[1:]
        ]
        good = [tuple(r) for r in rows if malformed_kind(r) is None and r[-1] == name]
        assert len(good) == len(set(good)), "no row is exported twice"
        assert Counter(r[4] for r in good)["SEND"] == 120
        complaints = sum(r[4] == "COMPLAINT" for r in good)
        assert final["counts"] == {**{t: 0 for t in EVENT_TYPES}, **counts, "complaint": complaints}
        assert final["malformed"] == len(good) // 6
        assert (await client.stats())["sends_created"] == {"job-1": 1}
        assert where(esp, name) == ["Done"]
