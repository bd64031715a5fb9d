"""The sandbox ESP's ``instiller`` flavor as a client sees it (docs/connectors/instiller.md).

REST under ``/rest`` with ``api_id``/``api_key`` request parameters, list files uploaded to
``upload/``, and responses only from the paged export API. The tests run the sandbox as a real
process and speak HTTP to it; no espbridge code is involved. The last tests exercise the engine
helpers other flavors build on (rate limits, tokens, imports from request rows) in-process.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import orjson
import pytest
from pydantic import SecretStr

from sandbox.engine import Account
from sandbox.flavors import generic
from sandbox.limits import MalformedRows, SlidingWindow, TokenBucket, TokenIssuer, retry_after_s
from sandbox.listfile import recipients as stored_recipients
from sandbox.protocol import ImportState
from sandbox.settings import Settings
from tests.fixtures.sandbox import BUSY_RATES, EVENT_TYPES, SandboxClient, Sandboxes
from tests.fixtures.waits import wait_for

FLAVOR = "instiller"
EXPORT_TYPES = {
    "output": ("SentDate", "sent", ()),
    "delivered": ("DeliveryDate", "delivered", ()),
    "hard": ("BounceDate", "bounce_hard", ("Reason",)),
    "soft": ("BounceDate", "bounce_soft", ("Reason",)),
    "returned": ("ReturnedDate", None, ("Reason",)),
    "open": ("OpenDate", "open", ()),
    "clicks_info": ("ClickDate", "click", ("ClickUrl",)),
    "complaints": ("ComplaintDate", "complaint", ()),
    "unsubscribes": ("UnsubscribeDate", "unsubscribe", ()),
}
COMMON_KEYS = ["Id", "SendId", "EmailApiIdentifier", "CommunicationKey", "Email"]
LOCAL_TIME_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")
LONDON = ZoneInfo("Europe/London")


# Helpers


def multipart(fields: dict[str, str]) -> aiohttp.FormData:
    """POST fields as the doc has them: ``multipart/form-data``."""
    return aiohttp.FormData(fields, default_to_multipart=True)


class Client:
    """Calls the flavor's API the way the doc says: credentials as request parameters."""

    def __init__(self, esp: SandboxClient) -> None:
        self.http = esp.http
        self.esp = esp
        self.creds = {"api_id": esp.account, "api_key": esp.token}

    async def get(
        self, path: str, creds: dict[str, str] | None = None, /, **params: str | int
    ) -> tuple[int, Any, dict[str, str]]:
        query = {**(self.creds if creds is None else creds), **{k: str(v) for k, v in params.items()}}
        async with self.http.get(f"{self.esp.url}/rest/{path}", params=query) as resp:
            return resp.status, orjson.loads(await resp.read()), dict(resp.headers)

    async def post(
        self, path: str, creds: dict[str, str] | None = None, /, **params: str
    ) -> tuple[int, Any, dict[str, str]]:
        form = multipart({**(self.creds if creds is None else creds), **params})
        async with self.http.post(f"{self.esp.url}/rest/{path}", data=form) as resp:
            return resp.status, orjson.loads(await resp.read()), dict(resp.headers)

    async def ok(self, method: str, path: str, /, **params: str | int) -> Any:
        if method == "GET":
            status, body, _ = await self.get(path, **params)
        else:
            status, body, _ = await self.post(path, **{k: str(v) for k, v in params.items()})
        assert status == 200, (path, status, body)
        return body

    async def import_list(self, job: str, file: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = await self.ok(
            "POST",
            "lists/import_file",
            list_api_identifier=f"espbridge_{job}",
            list_name=f"Job {job}",
            field_map_api_identifier="espbridge",
            file=file or f"upload/{job}.csv",
            external_id=job,
        )
        return body

    async def import_complete(self, import_id: str) -> dict[str, Any]:
        async def finished() -> dict[str, Any] | None:
            body: dict[str, Any] = await self.ok("GET", "lists/import_status", import_id=import_id)
            return body if body["state"] in ("complete", "failed") else None

        body: dict[str, Any] = await wait_for(finished, 15, 0.02, what=f"import {import_id} to finish")
        return body

    async def send(self, job: str, **extra: str) -> dict[str, Any]:
        body: dict[str, Any] = await self.ok(
            "POST",
            "emails/send",
            email_api_identifier="november_news",
            list_api_identifier=f"espbridge_{job}",
            external_id=job,
            **extra,
        )
        return body

    async def export_page(self, job: str, export_type: str, offset: int, limit: int) -> dict[str, Any]:
        body: dict[str, Any] = await self.ok(
            "GET",
            "emails/export_responses",
            list_api_identifier=f"espbridge_{job}",
            export_type=export_type,
            offset=offset,
            limit=limit,
        )
        return body


class Gatherer:
    """Pulls every export type page by page, as the connector does, keeping an offset per type."""

    def __init__(self, client: Client, job: str, page_size: int) -> None:
        self.client = client
        self.job = job
        self.page_size = page_size
        self.rows: dict[str, list[dict[str, str]]] = {t: [] for t in EXPORT_TYPES}

    async def round(self) -> None:
        for export_type, rows in self.rows.items():
            while True:
                page = await self.client.export_page(self.job, export_type, len(rows), self.page_size)
                assert page["offset"] == len(rows)
                assert page["limit"] == self.page_size
                assert page["export_type"] == export_type
                assert page["list_api_identifier"] == f"espbridge_{self.job}"
                assert len(page["rows"]) <= self.page_size
                rows.extend(page["rows"])
                if len(rows) >= page["total"]:
                    assert len(rows) == page["total"]
                    break


def write_list(esp: SandboxClient, name: str, rows: Sequence[Sequence[str]]) -> None:
    """Upload a list file as espbridge does: under a hidden name into ``upload/``, then renamed."""
    lines = []
    for row in rows:
        fields = ['"' + f.replace('"', '""') + '"' if any(c in f for c in ',"\n') else f for f in row]
        lines.append(",".join(fields) + "\n")
    esp.upload(f"upload/{name}", "".join(lines).encode())


def people(count: int, prefix: str = "k") -> list[list[str]]:
    rows = [["Email", "CommunicationKey", "FirstName"]]
    rows += [[f"user{i}@example.com", f"{prefix}{i}", f'Name "{i}", Jr.'] for i in range(count)]
    return rows


def is_malformed(row: dict[str, str], send_id: str) -> bool:
    return row["Id"].startswith(f"{send_id}-bad-")


def check_malformed(rows: dict[str, list[dict[str, str]]], send_id: str, every: int) -> dict[str, int]:
    """Each type's malformed rows follow every ``every``-th good row, spoiled as the doc says."""
    counts: dict[str, int] = {}
    for export_type, type_rows in rows.items():
        date = EXPORT_TYPES[export_type][0]
        good = 0
        for index, row in enumerate(type_rows):
            if is_malformed(row, send_id):
                assert good > 0, (export_type, index)
                assert good % every == 0, (export_type, index)
                assert not is_malformed(type_rows[index - 1], send_id)
                k = int(row["Id"].rsplit("-", 1)[1])
                kind = (k - 1) % 3
                if kind == 0:
                    assert row["CommunicationKey"] == row["Email"] == "", row
                    assert LOCAL_TIME_RE.fullmatch(row[date])
                elif kind == 1:
                    assert row[date] == "not-a-date", row
                    assert row["CommunicationKey"], row
                    assert row["Email"], row
                else:
                    assert date not in row, row
                counts[export_type] = counts.get(export_type, 0) + 1
            else:
                good += 1
                if good % every == 0:
                    assert index + 1 < len(type_rows), (export_type, index)
                    assert is_malformed(type_rows[index + 1], send_id), (export_type, index)
    return counts


# Tests


async def test_credentials_are_request_parameters(sandbox: Sandboxes) -> None:
    with sandbox(FLAVOR, accounts="demo,other") as esp:
        client, http = Client(esp), esp.http
        bad = [
            {},
            {"api_id": "demo"},
            {"api_id": "demo", "api_key": "wrong"},
            {"api_id": "nobody", "api_key": esp.token},
            {"api_id": "demo", "api_key": ""},
        ]
        for creds in bad:
            status, body, _ = await client.get("emails/list_sends", creds, external_id="job-1")
            assert (status, body["error"]) == (401, "invalid_credentials"), creds
            assert body["message"] == "API ID or key not recognised"
            status, body, _ = await client.post("emails/send", creds, external_id="job-1")
            assert (status, body["error"]) == (401, "invalid_credentials"), creds
            status, _, _ = await client.get("_sandbox/stats", creds)
            assert status == 401
        # Never in headers, and a POST takes them from its multipart form only.
        async with http.get(
            f"{esp.url}/rest/emails/list_sends",
            params={"external_id": "job-1"},
            headers={"Authorization": f"Bearer {esp.token}", "api_id": "demo", "api_key": esp.token},
        ) as resp:
            assert resp.status == 401
        async with http.post(
            f"{esp.url}/rest/emails/list_sends", params=client.creds, data=multipart({"external_id": "x"})
        ) as resp:
            assert resp.status == 405
        async with http.post(
            f"{esp.url}/rest/emails/send", params=client.creds, data=multipart({"external_id": "job-1"})
        ) as resp:
            assert resp.status == 401
        # A body in any other form is refused as such, credentials and all: url-encoded, JSON, none.
        fields, url = {**client.creds, "external_id": "job-1"}, f"{esp.url}/rest/emails/send"
        for request in [http.post(url, data=fields), http.post(url, json=fields), http.post(url)]:
            async with request as resp:
                assert resp.status == 415, resp.request_info.headers.get("Content-Type")
                refusal = await resp.json()
                assert refusal["error"] == "unsupported_media_type"
                assert "multipart/form-data" in refusal["message"]
        # Every account has the sandbox token.
        other = multipart({"api_id": "other", "api_key": esp.token, "external_id": "job-1"})
        async with http.post(f"{esp.url}/rest/emails/send", data=other) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == "invalid_parameter"
        assert await client.ok("GET", "emails/list_sends", external_id="job-1") == {"sends": []}
        repeated = [*client.creds.items(), ("external_id", "a"), ("external_id", "b")]
        async with http.get(f"{esp.url}/rest/emails/list_sends", params=repeated) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == "invalid_parameter"


async def test_import_send_and_paged_exports(sandbox: Sandboxes) -> None:
    rows = people(120)
    rows += [
        ["no-at-sign.example.com", "bad1", "x"],
        ["", "bad2", "x"],
        ["nokey@example.com", "", "x"],
        ["again@example.com", "k1", "x"],
        ["short@example.com", "bad3"],
    ]
    settings = {**BUSY_RATES, "rows_per_file": "20", "malformed_every": "7", "phase_delay_s": "0.2"}
    with sandbox(FLAVOR, **settings) as esp:
        client = Client(esp)
        assert sorted(p.name for p in esp.account_dir().iterdir() if not p.name.startswith(".")) == [
            "manifest",
            "upload",
        ]
        write_list(esp, "job-1.csv", rows)

        # Import: the errors of the call itself, then the states.
        base = {
            "list_api_identifier": "espbridge_job-1",
            "list_name": "Job 1",
            "field_map_api_identifier": "espbridge",
            "external_id": "job-1",
        }
        for file, expected in [
            ("upload/missing.csv", (404, "file_not_found")),
            ("upload/.job-1.csv.partial", (404, "file_not_found")),
            ("../job-1.csv", (400, "invalid_parameter")),
            ("/upload/job-1.csv", (400, "invalid_parameter")),
        ]:
            status, body, _ = await client.post("lists/import_file", **base, file=file)
            assert (status, body["error"]) == expected, file
        status, body, _ = await client.post(
            "lists/import_file", **{**base, "field_map_api_identifier": "nope"}, file="upload/job-1.csv"
        )
        assert (status, body["error"]) == (404, "field_map_not_found")
        status, body, _ = await client.post("lists/import_file", external_id="job-1", file="upload/job-1.csv")
        assert (status, body["error"]) == (400, "invalid_parameter")
        assert "list_api_identifier" in body["message"]

        created = await client.import_list("job-1")
        assert created["created"] is True
        assert created["state"] == "queued"
        assert (created["external_id"], created["list_api_identifier"]) == ("job-1", "espbridge_job-1")
        assert created["import_id"].startswith("imp-")
        # Not ready yet: a send is refused while the import runs.
        status, body, _ = await client.post(
            "emails/send",
            email_api_identifier="nov",
            list_api_identifier="espbridge_job-1",
            external_id="early",
        )
        assert (status, body["error"]) == (409, "list_not_ready")

        seen: set[str] = set()

        async def complete() -> dict[str, Any] | None:
            body: dict[str, Any] = await client.ok(
                "GET", "lists/import_status", import_id=created["import_id"]
            )
            seen.add(body["state"])
            return body if body["state"] == "complete" else None

        imported = await wait_for(complete, 15, 0.02, what="the import")
        assert "processing" in seen, seen
        assert imported == {
            "import_id": created["import_id"],
            "external_id": "job-1",
            "list_api_identifier": "espbridge_job-1",
            "file": "upload/job-1.csv",
            "state": "complete",
            "rows_total": 125,
            "rows_imported": 120,
            "rows_rejected": 5,
            "errors": [
                {"line": 122, "error": "invalid email"},
                {"line": 123, "error": "invalid email"},
                {"line": 124, "error": "empty CommunicationKey"},
                {"line": 125, "error": "duplicate CommunicationKey"},
                {"line": 126, "error": "expected 3 fields, found 2"},
            ],
        }
        # Idempotent: the same external_id answers the existing import, whatever else is sent.
        again = await client.ok("POST", "lists/import_file", external_id="job-1")
        assert again == {**imported, "created": False}
        status, body, _ = await client.get("lists/import_status", import_id="imp-nope")
        assert (status, body["error"]) == (404, "import_not_found")

        # A list without a send has nothing to export; unknown lists and types are refused.
        page = await client.export_page("job-1", "output", 0, 10)
        assert (page["total"], page["rows"]) == (0, [])
        status, body, _ = await client.get(
            "emails/export_responses", list_api_identifier="espbridge_nope", export_type="output"
        )
        assert (status, body["error"]) == (404, "list_not_found")
        cases: list[tuple[dict[str, str | int], str]] = [
            ({"export_type": "oprn"}, "invalid_export_type"),
            ({"export_type": "open", "limit": 5001}, "invalid_parameter"),
            ({"export_type": "open", "limit": 0}, "invalid_parameter"),
            ({"export_type": "open", "offset": -1}, "invalid_parameter"),
            ({"export_type": "open", "offset": "x"}, "invalid_parameter"),
        ]
        for params, code in cases:
            status, body, _ = await client.get(
                "emails/export_responses", list_api_identifier="espbridge_job-1", **params
            )
            assert (status, body["error"]) == (400, code), params

        # Send: unknown lists, then the send, idempotent by external_id.
        status, body, _ = await client.post(
            "emails/send", email_api_identifier="nov", list_api_identifier="espbridge_nope", external_id="x"
        )
        assert (status, body["error"]) == (404, "list_not_found")
        sent = await client.send("job-1", email_profile_api_identifier="")
        assert sent["created"] is True
        assert sent["state"] == "scheduled"
        assert (sent["recipients"], sent["send_at"], sent["error"]) == (120, None, None)
        send_id = sent["send_id"]
        again = await client.ok("POST", "emails/send", external_id="job-1")
        assert (again["send_id"], again["created"]) == (send_id, False)
        # The send's recipients are subscribed on the account's list (an unsubscribe has a row to change).
        async with esp.http.get(
            f"{esp.api()}/_sandbox/contacts", params={"list": "newsletter"}, headers=esp.headers
        ) as resp:
            members = (await resp.json())["contacts"]
        assert len(members) == 120
        assert {m["state"] for m in members} == {"subscribed"}

        # The connector's pull loop, while the rows are being released: offsets stay valid.
        gatherer = Gatherer(client, "job-1", page_size=13)
        manifest: dict[str, Any] | None = None
        deadline = time.monotonic() + 15
        while manifest is None or not manifest["complete"]:
            assert time.monotonic() < deadline, "the send did not complete"
            manifest = esp.manifest("job-1")
            await gatherer.round()
        await gatherer.round()
        assert manifest is not None

        listed = await client.ok("GET", "emails/list_sends", external_id="job-1")
        assert [s["send_id"] for s in listed["sends"]] == [send_id]
        send_obj = listed["sends"][0]
        assert send_obj == await client.ok("GET", "emails/send_status", send_id=send_id)
        assert {k: send_obj[k] for k in ("state", "email_api_identifier", "list_api_identifier")} == {
            "state": "sent",
            "email_api_identifier": "november_news",
            "list_api_identifier": "espbridge_job-1",
        }
        assert LOCAL_TIME_RE.fullmatch(send_obj["started_at"])
        assert LOCAL_TIME_RE.fullmatch(send_obj["finished_at"])
        assert await client.ok("GET", "emails/list_sends", external_id="nope") == {"sends": []}
        status, body, _ = await client.get("emails/send_status", send_id="snd-nope")
        assert (status, body["error"]) == (404, "send_not_found")
        assert await client.esp.stats() == {
            "sends_created": {"job-1": 1},
            "sends_cancelled": {},
            "imports_created": {"job-1": 1},
            "rate_limited": 0,
        }
        page = await client.export_page("job-1", "open", 10_000, 5)
        assert page["rows"] == []
        assert page["total"] > 0

    rows_by_type = gatherer.rows
    assert set(manifest) == {
        "broadcast_id",
        "send_id",
        "list_api_identifier",
        "recipients",
        "counts",
        "esp_only",
        "malformed",
        "complete",
    }
    assert (manifest["broadcast_id"], manifest["send_id"]) == ("job-1", send_id)
    assert (manifest["list_api_identifier"], manifest["recipients"]) == ("espbridge_job-1", 120)
    malformed = check_malformed(rows_by_type, send_id, every=7)
    assert malformed == manifest["malformed"]
    assert sum(malformed.values()) > 0

    counts = dict.fromkeys(EVENT_TYPES, 0)
    returned = 0
    keys = {f"k{i}": f"user{i}@example.com" for i in range(120)}
    ids: list[str] = []
    identities: Counter[tuple[str, str, str, str]] = Counter()
    for export_type, type_rows in rows_by_type.items():
        date, event_type, extras = EXPORT_TYPES[export_type]
        good = [r for r in type_rows if not is_malformed(r, send_id)]
        assert [r[date] for r in good] == sorted(r[date] for r in good), f"{export_type} not in time order"
        for row in good:
            assert list(row) == [*COMMON_KEYS, date, *extras], row
            assert all(isinstance(v, str) for v in row.values())
            assert re.fullmatch(rf"{send_id}-\d+", row["Id"])
            assert (row["SendId"], row["EmailApiIdentifier"]) == (send_id, "november_news")
            assert keys[row["CommunicationKey"]] == row["Email"]
            assert LOCAL_TIME_RE.fullmatch(row[date])
            if "ClickUrl" in extras:
                assert row["ClickUrl"].startswith("https://example.com/")
            if "Reason" in extras:
                assert row["Reason"]
            identities[row["CommunicationKey"], export_type, row.get("ClickUrl", ""), row[date]] += 1
            ids.append(row["Id"])
        if event_type is None:
            returned += len(good)
        else:
            counts[event_type] += len(good)
    assert counts == manifest["counts"]
    assert manifest["esp_only"] == {"returned": returned}
    assert all(counts[t] > 0 for t in EVENT_TYPES), counts
    assert returned > 0
    assert counts["sent"] == 120
    assert len(ids) == len(set(ids)), "an event id was served twice"
    assert [k for k, n in identities.items() if n > 1] == []
    reasons = {r["Reason"] for r in rows_by_type["hard"]}
    assert reasons == {'550 5.1.1 "user unknown"'}
    assert any("," in r["ClickUrl"] for r in rows_by_type["clicks_info"])


async def test_send_at_and_list_states(sandbox: Sandboxes) -> None:
    with sandbox(FLAVOR) as esp:
        client = Client(esp)
        write_list(esp, "job-s.csv", people(5))
        write_list(esp, "job-f.csv", [["Email", "Key"], ["a@example.com", "1"]])
        failed = await client.import_complete((await client.import_list("job-f"))["import_id"])
        assert failed["state"] == "failed"
        assert failed["errors"][0]["line"] == 1
        status, body, _ = await client.post(
            "emails/send",
            email_api_identifier="m",
            list_api_identifier="espbridge_job-f",
            external_id="job-f",
        )
        assert (status, body["error"]) == (409, "list_not_ready")

        await client.import_complete((await client.import_list("job-s"))["import_id"])
        for bad in ("2026-07-01T09:00:00Z", "tomorrow", "2026-13-01 10:00:00"):
            status, body, _ = await client.post(
                "emails/send",
                email_api_identifier="m",
                list_api_identifier="espbridge_job-s",
                external_id="job-s",
                send_at=bad,
            )
            assert (status, body["error"]) == (400, "invalid_parameter"), bad
        later = (datetime.now(LONDON) + timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S")
        sent = await client.send("job-s", send_at=later)
        assert (sent["state"], sent["send_at"], sent["started_at"]) == ("scheduled", later, None)
        status_body = await client.ok("GET", "emails/send_status", send_id=sent["send_id"])
        assert status_body["state"] == "scheduled"
        page = await client.export_page("job-s", "output", 0, 10)
        assert page["total"] == 0


async def test_over_the_limit_answers_429(sandbox: Sandboxes) -> None:
    settings = {"api_limit_per_s": "1", "api_limit_burst": "3"}
    with sandbox(FLAVOR, **settings) as esp:
        client = Client(esp)
        answers = [await client.get("emails/list_sends", external_id="job-1") for _ in range(8)]
        statuses = [status for status, _, _ in answers]
        assert statuses[:3] == [200, 200, 200]
        limited = [(body, headers) for status, body, headers in answers if status == 429]
        assert len(limited) >= 4, statuses
        for body, headers in limited:
            assert body["error"] == "rate_limited"
            assert int(headers["Retry-After"]) >= 1
        # Bad credentials are refused before the limit is looked at, and stats are never limited.
        status, _, _ = await client.get(
            "emails/list_sends", {"api_id": "demo", "api_key": "x"}, external_id="a"
        )
        assert status == 401
        for _ in range(5):
            stats = await client.esp.stats()
        assert stats["rate_limited"] == len(limited)

        async def accepted() -> bool | None:
            status, _, _ = await client.get("emails/list_sends", external_id="job-1")
            return True if status == 200 else None

        await wait_for(accepted, 5, 0.02, what="the bucket to refill")


async def collect_all(client: Client, job: str) -> dict[str, list[dict[str, str]]]:
    gatherer = Gatherer(client, job, page_size=5000)
    await gatherer.round()
    return gatherer.rows


def comparable(rows: dict[str, list[dict[str, str]]], send_id: str) -> dict[str, list[tuple[Any, ...]]]:
    """The rows without what differs between two runs (the send id, the send time)."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for export_type, type_rows in rows.items():
        date = EXPORT_TYPES[export_type][0]
        out[export_type] = [
            (
                r["Id"].removeprefix(send_id),
                r["CommunicationKey"],
                r["Email"],
                r.get(date, "<absent>") == "not-a-date",
                date in r,
                r.get("ClickUrl"),
                r.get("Reason"),
            )
            for r in type_rows
        ]
    return out


async def test_a_restart_midway_continues_the_log_without_duplicates(
    sandbox: Sandboxes, tmp_path: Path
) -> None:
    settings = {**BUSY_RATES, "seed": "7", "rows_per_file": "15", "malformed_every": "5"}
    token = "restart-token"
    rows = people(60)

    # The reference: the same list, seed and job, uninterrupted, on another root.
    with sandbox(FLAVOR, root=tmp_path / "ref" / "sftp", token=token, **settings) as ref:
        client = Client(ref)
        write_list(ref, "job-r.csv", rows)
        await client.import_complete((await client.import_list("job-r"))["import_id"])
        ref_send = (await client.send("job-r"))["send_id"]
        expected_manifest = await ref.complete_manifest("job-r")
        expected = comparable(await collect_all(client, "job-r"), ref_send)

    root = tmp_path / "run" / "sftp"
    with sandbox(FLAVOR, root=root, token=token, **{**settings, "phase_delay_s": "1.5"}) as first:
        client = Client(first)
        write_list(first, "job-r.csv", rows)
        await client.import_complete((await client.import_list("job-r"))["import_id"])
        send_id = (await client.send("job-r"))["send_id"]

        async def output_released() -> dict[str, Any] | None:
            page = await client.export_page("job-r", "output", 0, 5000)
            return page if page["total"] >= 60 else None

        before = (await wait_for(output_released, 15, 0.02, what="the output rows"))["rows"]
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    interrupted = first.manifest("job-r")
    assert interrupted is not None
    assert not interrupted["complete"], "the send finished before the kill; nothing was resumed"

    with sandbox(FLAVOR, root=root, token=token, **settings) as second:
        client = Client(second)
        manifest = await second.complete_manifest("job-r")
        after = await collect_all(client, "job-r")
        assert (await client.esp.stats())["sends_created"] == {"job-r": 1}
        listed = await client.ok("GET", "emails/list_sends", external_id="job-r")
        assert [(s["send_id"], s["state"]) for s in listed["sends"]] == [(send_id, "sent")]

    assert after["output"][: len(before)] == before, "a released row moved"
    ids = [r["Id"] for type_rows in after.values() for r in type_rows]
    assert len(ids) == len(set(ids)), "a row was released twice"
    assert comparable(after, send_id) == expected
    assert {k: manifest[k] for k in ("counts", "esp_only", "malformed", "recipients")} == {
        k: expected_manifest[k] for k in ("counts", "esp_only", "malformed", "recipients")
    }


# The engine helpers other flavors use


def test_token_bucket_and_sliding_window() -> None:
    now = [100.0]
    bucket = TokenBucket(2.0, 3, clock=lambda: now[0])
    assert [bucket.acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.acquire() == pytest.approx(0.5)
    assert bucket.acquire() == pytest.approx(0.5), "a refused call takes no token"
    now[0] += 0.5
    assert bucket.acquire() == 0.0
    now[0] += 10
    assert [bucket.acquire() for _ in range(4)][-1] > 0, "at most burst tokens are saved up"

    window = SlidingWindow(2, 1.0, clock=lambda: now[0])
    assert [window.acquire(), window.acquire()] == [0.0, 0.0]
    now[0] += 0.25
    assert window.acquire() == pytest.approx(0.75)
    now[0] += 0.75
    assert window.acquire() == 0.0
    assert [retry_after_s(w) for w in (0.01, 1.0, 1.2)] == [1, 1, 2]


def test_issued_tokens_expire_and_refresh_once() -> None:
    now = [0.0]
    issuer = TokenIssuer(60, clock=lambda: now[0])
    token = issuer.issue("demo")
    assert token.expires_in == 60
    assert issuer.account_of(token.access_token) == "demo"
    assert issuer.account_of("forged") is None
    now[0] = 60
    assert issuer.account_of(token.access_token) is None
    renewed = issuer.refresh(token.refresh_token)
    assert renewed is not None
    assert issuer.account_of(renewed.access_token) == "demo"
    assert issuer.refresh(token.refresh_token) is None, "refresh tokens are single-use"
    assert issuer.issued["demo"] == 2


def test_malformed_rows_follow_every_nth_per_stream() -> None:
    rows = MalformedRows(3)
    decisions = [rows.after_good(s) for s in ["a", "a", "b", "a", "b", "b", "a", "a", "a"]]
    assert decisions == [None, None, None, 1, None, 2, None, None, 3]
    assert rows.counts == {"a": 2, "b": 1}
    assert [MalformedRows.kind(k, 3) for k in (1, 2, 3, 4)] == [0, 1, 2, 0]
    assert MalformedRows(0).after_good("a") is None


async def test_an_import_from_request_rows(tmp_path: Path) -> None:
    """Recipients received in chunks of API requests become an import like a list file's."""
    settings = Settings(root=tmp_path, token=SecretStr("t"), import_delay_s=0.0)
    folder = tmp_path / "sandbox" / "demo"
    account = Account("demo", folder, settings, generic.FLAVOR, threading.Event())
    account.open()
    header = ["Email", "CommunicationKey", "City"]
    record, created = await account.create_import_from_rows(
        "job-c", header, [["a@example.com", "k1", "Leeds, UK"]], attrs={"list": "L"}, complete=False
    )
    assert created
    assert record.receiving
    assert record.attrs == {"list": "L"}
    await account.add_rows(record.import_id, [["b@example.com", "k2", 'say "hi"\nthere']])
    await account.add_rows(record.import_id, [])
    # A restarted sandbox still has the staged chunks, and the import waits for more.
    reopened = Account("demo", folder, settings, generic.FLAVOR, threading.Event())
    reopened.open()
    reopened.start()
    assert reopened.state.imports[record.import_id].chunks == 2
    assert reopened.state.imports[record.import_id].state is ImportState.QUEUED
    await reopened.add_rows(record.import_id, [["bad", "k3", ""], ["c@example.com", "k1", ""]], complete=True)
    done = await reopened.finished_import(record.import_id)
    assert done.state is ImportState.DONE
    assert (done.rows_total, done.rows_valid, done.rows_invalid) == (4, 2, 2)
    assert done.errors == [
        {"line": 5, "error": "invalid email"},
        {"line": 6, "error": "duplicate CommunicationKey"},
    ]
    assert list(stored_recipients(folder / ".sandbox-lists" / f"{record.import_id}.csv")) == [
        ("a@example.com", "k1"),
        ("b@example.com", "k2"),
    ]
    again, created = await reopened.create_import_from_rows("job-c", header)
    assert (again.import_id, created) == (record.import_id, False)
    await reopened.close()
    await account.close()
