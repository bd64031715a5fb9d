"""The sandbox ESP as a client sees it: its REST API, the SFTP tree it reads and writes, restarts.

No Kafka, PostgreSQL or sshd: the sandbox runs as a real process on a temporary root, and the tests
read and write that root the way the SFTP server would serve it.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import signal
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sandbox.flavors import FLAVORS
from tests.fixtures.sandbox import EVENT_TYPES, SandboxClient, Sandboxes, file_ids
from tests.fixtures.waits import wait_for

PHASES = ("sent", "delivery", "opens", "clicks", "optouts")
PHASE_OF = {
    "sent": "sent",
    "delivered": "delivery",
    "bounce_hard": "delivery",
    "bounce_soft": "delivery",
    "open": "opens",
    "click": "clicks",
    "unsubscribe": "optouts",
    "complaint": "optouts",
}
# The header line docs/generic-esp.md documents, written out here: a flavor that wrote another fails.
HEADER = [
    "EventId",
    "BroadcastId",
    "MessageId",
    "CommunicationKey",
    "Email",
    "EventType",
    "Url",
    "OccurredAt",
]
FILE_RE = re.compile(r"^(?P<send>snd-[A-Za-z0-9]+)_(?P<seq>\d{3,})_(?P<phase>[a-z]+)\.csv$")
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


# Helpers


def drop_list(esp: SandboxClient, name: str, rows: Sequence[Sequence[str]], bom: bool = False) -> str:
    """Upload a list file the way a client does (hidden name, then rename); returns its ``file``."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return esp.upload(f"drop/{name}", (b"\xef\xbb\xbf" if bom else b"") + buffer.getvalue().encode())


def recipients(count: int, prefix: str = "k") -> list[list[str]]:
    """A list with a header and ``count`` valid recipients (attributes that need quoting included)."""
    rows = [["Email", "CommunicationKey", "FirstName"]]
    rows += [[f"user{i}@example.com", f"{prefix}{i}", f'Name "{i}", Jr.\nline two'] for i in range(count)]
    return rows


async def api(esp: SandboxClient, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """Call the account's API with the token; returns (status, JSON body)."""
    async with esp.http.request(method, esp.api() + path, json=body, headers=esp.headers) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def import_done(esp: SandboxClient, file: str, external_id: str) -> dict[str, Any]:
    """Import a dropped file and wait until the import is done or failed."""
    status, created = await api(
        esp, "POST", "/imports", {"file": file, "list_name": "test", "external_id": external_id}
    )
    assert status == 202, created
    assert created["state"] == "queued"

    async def finished() -> dict[str, Any] | None:
        _, body = await api(esp, "GET", f"/imports/{created['import_id']}")
        return body if body["state"] in ("done", "failed") else None

    result: dict[str, Any] = await wait_for(finished, 30, 0.02, what=f"import {external_id}")
    return result


def read_events(account_dir: Path, files: Sequence[str]) -> list[dict[str, str]]:
    """All rows of the given response files, header checked."""
    events: list[dict[str, str]] = []
    for name in files:
        with (account_dir / name).open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            assert next(reader) == HEADER
            events += [dict(zip(HEADER, row, strict=True)) for row in reader]
    return events


def file_name_parts(name: str) -> tuple[str, int, str]:
    """(send_id, seq, phase) of a response file name."""
    match = FILE_RE.match(name)
    assert match is not None, name
    return match["send"], int(match["seq"]), match["phase"]


def response_files(esp: SandboxClient) -> list[str]:
    return sorted(p.name for p in (esp.account_dir() / "responses").iterdir())


@pytest.fixture
def sandbox_esp(sandbox: Sandboxes) -> SandboxClient:
    """A generic sandbox ESP with fast timings on a fresh root."""
    return sandbox()


# Authentication and errors


async def test_wrong_or_missing_token_is_401(sandbox_esp: SandboxClient) -> None:
    url = sandbox_esp.api() + "/sends?external_id=x"
    http = sandbox_esp.http
    for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": sandbox_esp.token}):
        async with http.get(url, headers=headers) as resp:
            assert resp.status == 401
            body = await resp.json()
            assert body["error"] == "unauthorized"
            assert body["message"]
    async with http.get(url, headers=sandbox_esp.headers) as resp:
        assert resp.status == 200
        assert await resp.json() == {"sends": []}
    async with http.get(sandbox_esp.api("nobody") + "/sends", headers=sandbox_esp.headers) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "account_not_found"
    assert sandbox_esp.token not in sandbox_esp.log_text()


async def test_unknown_objects_and_bad_requests(sandbox_esp: SandboxClient) -> None:
    esp = sandbox_esp
    assert await api(esp, "GET", "/imports/imp-nope") == (
        404,
        {"error": "import_not_found", "message": "no import imp-nope"},
    )
    status, body = await api(esp, "GET", "/sends/snd-nope")
    assert (status, body["error"]) == (404, "send_not_found")
    status, body = await api(esp, "POST", "/imports", {"file": "drop/missing.csv", "external_id": "j1"})
    assert (status, body["error"]) == (404, "file_not_found")
    for outside in ("responses/x.csv", "drop/../x.csv", "/etc/passwd", "drop/.hidden.csv"):
        status, body = await api(esp, "POST", "/imports", {"file": outside, "external_id": "j1"})
        assert (status, body["error"]) == (400, "invalid_request"), outside
    status, body = await api(esp, "POST", "/sends", {"import_id": "imp-x", "message": "m"})
    assert (status, body["error"]) == (400, "invalid_request")
    status, body = await api(
        esp, "POST", "/sends", {"import_id": "imp-x", "message": "m", "external_id": "j1"}
    )
    assert (status, body["error"]) == (404, "import_not_found")
    stats = (await api(esp, "GET", "/_sandbox/stats"))[1]
    assert sum(stats.pop("calls_per_second").values()) == 9  # each call above, refused ones too
    assert stats == {"sends_created": {}, "sends_cancelled": {}, "imports_created": {}}


# Imports


async def test_import_of_a_good_list(sandbox_esp: SandboxClient) -> None:
    file = drop_list(sandbox_esp, "job-good.csv", recipients(25))
    done = await import_done(sandbox_esp, file, "job-good")
    assert done["state"] == "done"
    assert (done["rows_total"], done["rows_valid"], done["rows_invalid"], done["errors"]) == (25, 25, 0, [])
    assert done["external_id"] == "job-good"
    assert done["list_id"]


async def test_import_tolerates_a_byte_order_mark(sandbox_esp: SandboxClient) -> None:
    file = drop_list(sandbox_esp, "job-bom.csv", recipients(3), bom=True)
    done = await import_done(sandbox_esp, file, "job-bom")
    assert (done["state"], done["rows_valid"]) == ("done", 3)


async def test_import_counts_bad_rows_with_their_line_numbers(sandbox_esp: SandboxClient) -> None:
    rows = [
        ["Email", "CommunicationKey", "Note"],
        ["a@example.com", "k1", "two\nlines"],  # lines 2-3
        ["no-at-sign", "k2", ""],  # line 4
        ["", "k3", ""],  # line 5
        ["b@example.com", "", ""],  # line 6
        ["c@example.com", "k1", ""],  # line 7: k1 was imported on line 2
        ["d@example.com", "k4"],  # line 8: a field short
        ["e@example.com", "k5", "fine"],  # line 9
    ]
    done = await import_done(sandbox_esp, drop_list(sandbox_esp, "job-bad.csv", rows), "job-bad")
    assert done["state"] == "done"
    assert (done["rows_total"], done["rows_valid"], done["rows_invalid"]) == (7, 2, 5)
    assert [e["line"] for e in done["errors"]] == [4, 5, 6, 7, 8]
    assert [e["error"] for e in done["errors"][:4]] == [
        "invalid email",
        "invalid email",
        "empty CommunicationKey",
        "duplicate CommunicationKey",
    ]


async def test_import_lists_at_most_100_errors(sandbox_esp: SandboxClient) -> None:
    rows = [["Email", "CommunicationKey"]] + [[f"bad{i}", f"k{i}"] for i in range(150)] + [["ok@x.org", "ok"]]
    done = await import_done(sandbox_esp, drop_list(sandbox_esp, "job-many.csv", rows), "job-many")
    assert (done["rows_total"], done["rows_valid"], done["rows_invalid"]) == (151, 1, 150)
    assert [e["line"] for e in done["errors"]] == list(range(2, 102))


@pytest.mark.parametrize("header", [["Email", "Key"], ["EmailAddress", "CommunicationKey"]])
async def test_import_without_a_required_column_fails(sandbox_esp: SandboxClient, header: list[str]) -> None:
    file = drop_list(sandbox_esp, "job-nohdr.csv", [header, ["a@example.com", "k1"]])
    done = await import_done(sandbox_esp, file, "job-nohdr")
    assert done["state"] == "failed"
    assert done["errors"][0]["line"] == 1
    assert done["list_id"] is None


async def test_import_is_idempotent_by_external_id(sandbox_esp: SandboxClient) -> None:
    file = drop_list(sandbox_esp, "job-idem.csv", recipients(5))
    body = {"file": file, "list_name": "x", "external_id": "job-idem"}
    status, first = await api(sandbox_esp, "POST", "/imports", body)
    assert status == 202
    again = await asyncio.gather(*(api(sandbox_esp, "POST", "/imports", body) for _ in range(5)))
    assert {(s, b["import_id"]) for s, b in again} == {(200, first["import_id"])}
    _, stats = await api(sandbox_esp, "GET", "/_sandbox/stats")
    assert stats["imports_created"] == {"job-idem": 1}


# Sends


async def test_only_a_done_import_can_be_sent(sandbox: Sandboxes) -> None:
    with sandbox(import_delay_s="60") as esp:
        file = drop_list(esp, "job-slow.csv", recipients(3))
        status, created = await api(esp, "POST", "/imports", {"file": file, "external_id": "job-slow"})
        assert (status, created["state"]) == (202, "queued")
        send = {"import_id": created["import_id"], "message": "msg-1", "external_id": "job-slow"}
        status, body = await api(esp, "POST", "/sends", send)
        assert (status, body["error"]) == (409, "import_not_done")
        assert (await api(esp, "GET", "/sends?external_id=job-slow"))[1] == {"sends": []}
        assert esp.stop() == 0


async def test_a_failed_import_cannot_be_sent(sandbox_esp: SandboxClient) -> None:
    file = drop_list(sandbox_esp, "job-f.csv", [["Email"], ["a@example.com"]])
    failed = await import_done(sandbox_esp, file, "job-f")
    assert failed["state"] == "failed"
    send = {"import_id": failed["import_id"], "message": "msg-1", "external_id": "job-f"}
    status, body = await api(sandbox_esp, "POST", "/sends", send)
    assert (status, body["error"]) == (409, "import_not_done")


async def test_send_writes_response_files_phase_by_phase(sandbox: Sandboxes) -> None:
    with sandbox(phase_delay_s="0.2", rows_per_file="40") as esp:
        done = await import_done(esp, drop_list(esp, "job-r.csv", recipients(200)), "job-r")
        body = {"import_id": done["import_id"], "message": "msg-42", "external_id": "job-r", "send_at": None}
        status, created = await api(esp, "POST", "/sends", body)
        assert (status, created["state"]) == (202, "scheduled")
        send_id = created["send_id"]

        # Watch the files arrive: every snapshot is a prefix of the final sequence, phase by phase.
        snapshots: list[list[str]] = []
        states: list[str] = []

        async def complete() -> dict[str, Any] | None:
            files = [n for n in response_files(esp) if not n.startswith(".")]
            if not snapshots or snapshots[-1] != files:
                snapshots.append(files)
            _, send = await api(esp, "GET", f"/sends/{send_id}")
            if not states or states[-1] != send["state"]:
                states.append(send["state"])
            manifest = esp.manifest("job-r")
            return manifest if manifest is not None and manifest["complete"] else None

        manifest = await wait_for(complete, 30, 0.02, what="the responses of job-r")
        assert esp.stop() == 0

    final = response_files(esp)
    assert not [n for n in final if n.startswith(".")], "temporary files left behind"
    assert manifest["files"] == [f"responses/{n}" for n in final]
    assert all(s == final[: len(s)] for s in snapshots)
    assert len(snapshots) >= len(PHASES), "the files did not arrive over time"
    parsed = [file_name_parts(n) for n in final]
    assert {send for send, _, _ in parsed} == {send_id}
    assert [seq for _, seq, _ in parsed] == list(range(1, len(final) + 1))
    phases_in_order = [phase for _, _, phase in parsed]
    assert phases_in_order == sorted(phases_in_order, key=PHASES.index)
    assert states[-1] == "sent"
    assert set(states) <= {"scheduled", "sending", "sent"}

    events = read_events(esp.account_dir(), manifest["files"])
    counts = Counter(e["EventType"] for e in events)
    assert manifest["counts"] == {t: counts.get(t, 0) for t in EVENT_TYPES}
    assert manifest["recipients"] == 200
    assert (manifest["broadcast_id"], manifest["send_id"]) == ("job-r", send_id)
    assert counts["sent"] == 200
    assert counts["delivered"] + counts["bounce_hard"] + counts["bounce_soft"] == 200
    assert counts["open"] > 0

    assert len({e["EventId"] for e in events}) == len(events)
    for name in final:
        in_file = read_events(esp.account_dir(), [f"responses/{name}"])
        assert 0 < len(in_file) <= 40
        assert {PHASE_OF[e["EventType"]] for e in in_file} == {file_name_parts(name)[2]}
    keys = {f"k{i}" for i in range(200)}
    first_seen: dict[str, str] = {}
    for e in events:
        assert (e["BroadcastId"], e["MessageId"]) == ("job-r", "msg-42")
        assert e["CommunicationKey"] in keys
        assert TIME_RE.match(e["OccurredAt"])
        assert bool(e["Url"]) == (e["EventType"] == "click")
        if e["EventType"] == "sent":
            first_seen[e["CommunicationKey"]] = e["OccurredAt"]
    for e in events:
        assert e["OccurredAt"] >= first_seen[e["CommunicationKey"]], "an event before its message was sent"


async def test_send_is_idempotent_and_sent_exactly_once(sandbox_esp: SandboxClient) -> None:
    esp = sandbox_esp
    job = "2026-11-22:once"  # job ids may hold ':'
    done = await import_done(esp, drop_list(esp, "job-once.csv", recipients(20)), job)
    body = {"import_id": done["import_id"], "message": "msg-1", "external_id": job, "send_at": None}
    answers = await asyncio.gather(*(api(esp, "POST", "/sends", body) for _ in range(5)))
    assert sorted(s for s, _ in answers) == [200, 200, 200, 200, 202]
    assert len({b["send_id"] for _, b in answers}) == 1
    manifest = await esp.complete_manifest(job, timeout_s=60)
    status, again = await api(esp, "POST", "/sends", body)
    assert (status, again["send_id"], again["external_id"]) == (200, manifest["send_id"], job)
    assert again["state"] == "sent"

    _, listed = await api(esp, "GET", f"/sends?external_id={job}")
    assert [s["send_id"] for s in listed["sends"]] == [manifest["send_id"]]
    assert set(listed["sends"][0]) == {
        "send_id",
        "external_id",
        "import_id",
        "message",
        "state",
        "recipients",
        "send_at",
        "started_at",
        "finished_at",
    }
    _, stats = await api(esp, "GET", "/_sandbox/stats")
    assert stats.pop("calls_per_second"), "the calls above are counted"
    assert stats == {"sends_created": {job: 1}, "sends_cancelled": {}, "imports_created": {job: 1}}
    assert {file_name_parts(n)[0] for n in response_files(esp)} == {manifest["send_id"]}


async def test_send_at_in_the_future_waits(sandbox_esp: SandboxClient) -> None:
    esp = sandbox_esp
    done = await import_done(esp, drop_list(esp, "job-later.csv", recipients(5)), "job-later")
    send_at = (datetime.now(UTC) + timedelta(seconds=3)).replace(microsecond=0)
    body = {
        "import_id": done["import_id"],
        "message": "msg-1",
        "external_id": "job-later",
        "send_at": send_at.isoformat().replace("+00:00", "Z"),
    }
    status, created = await api(esp, "POST", "/sends", body)
    assert status == 202
    _, send = await api(esp, "GET", f"/sends/{created['send_id']}")
    assert (send["state"], send["started_at"], send["send_at"]) == ("scheduled", None, body["send_at"])
    assert esp.manifest("job-later") is None
    await esp.complete_manifest("job-later", timeout_s=60)
    _, send = await api(esp, "GET", f"/sends/{created['send_id']}")
    assert send["state"] == "sent"
    assert datetime.fromisoformat(send["started_at"]) >= send_at


async def test_a_cancelled_send_sends_nothing_and_a_sent_one_cannot_be_cancelled(
    sandbox_esp: SandboxClient,
) -> None:
    esp = sandbox_esp
    later = await import_done(esp, drop_list(esp, "job-cancel.csv", recipients(5)), "job-cancel")
    send_at = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    body = {"import_id": later["import_id"], "message": "m", "external_id": "job-cancel", "send_at": send_at}
    _, created = await api(esp, "POST", "/sends", body)
    cancel = f"/sends/{created['send_id']}/cancel"
    answers = [await api(esp, "POST", cancel) for _ in range(2)]
    assert [(status, b["state"]) for status, b in answers] == [(200, "cancelled"), (200, "cancelled")]
    assert (await api(esp, "GET", f"/sends/{created['send_id']}"))[1]["state"] == "cancelled"

    now = await import_done(esp, drop_list(esp, "job-now.csv", recipients(5)), "job-now")
    body = {"import_id": now["import_id"], "message": "m", "external_id": "job-now", "send_at": None}
    _, sent = await api(esp, "POST", "/sends", body)
    await esp.complete_manifest("job-now")
    status, refused = await api(esp, "POST", f"/sends/{sent['send_id']}/cancel")
    assert (status, refused["error"]) == (409, "send_not_cancellable")
    assert (await api(esp, "POST", "/sends/snd-unknown/cancel"))[0] == 404

    stats = await esp.stats()
    assert (stats["sends_created"], stats["sends_cancelled"]) == (
        {"job-cancel": 1, "job-now": 1},
        {"job-cancel": 1},
    )
    assert esp.manifest("job-cancel") is None
    assert {file_name_parts(n)[0] for n in response_files(esp)} == {sent["send_id"]}


# Restarts


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_restart_mid_send_resumes_without_duplicates(
    sandbox: Sandboxes, tmp_path: Path, sig: signal.Signals
) -> None:
    rows = recipients(300)
    settings = {"seed": "7", "rows_per_file": "50"}
    token = "restart-token"

    # The reference: the same list, seed and broadcast, uninterrupted, on another root.
    with sandbox(root=tmp_path / "ref" / "sftp", token=token, **settings) as ref:
        done = await import_done(ref, drop_list(ref, "job-x.csv", rows), "job-x")
        body = {"import_id": done["import_id"], "message": "msg-9", "external_id": "job-x", "send_at": None}
        assert (await api(ref, "POST", "/sends", body))[0] == 202
        expected = await ref.complete_manifest("job-x", timeout_s=60)
        expected_events = read_events(ref.account_dir(), expected["files"])
        assert ref.stop() == 0

    root = tmp_path / "run" / "sftp"
    with sandbox(root=root, token=token, phase_delay_s="1.0", **settings) as first:
        done = await import_done(first, drop_list(first, "job-x.csv", rows), "job-x")
        body = {"import_id": done["import_id"], "message": "msg-9", "external_id": "job-x", "send_at": None}
        status, created = await api(first, "POST", "/sends", body)
        assert status == 202

        async def some_files() -> dict[str, Any] | None:
            manifest = first.manifest("job-x")
            return manifest if manifest is not None and manifest["files"] else None

        await wait_for(some_files, 30, 0.02, what="the first response files")
        exit_code = first.stop(sig)
        assert exit_code == (0 if sig is signal.SIGTERM else -signal.SIGKILL)
    interrupted = first.manifest("job-x")
    assert interrupted is not None
    assert not interrupted["complete"], "the send finished before the stop; nothing was resumed"
    account_dir = first.account_dir()
    before = file_ids(p for p in (account_dir / "responses").iterdir() if not p.name.startswith("."))
    # The client has processed the first file meanwhile: it is in archive/ and must stay there.
    archived = min(before)
    (account_dir / "responses" / archived).rename(account_dir / "archive" / archived)

    # Other seed, file cuts and rates now: the send goes on with those it was created under.
    changed = {"seed": "8", "rows_per_file": "30", "rate_open": "0.9"}
    with sandbox(root=root, token=token, phase_delay_s="0.05", **changed) as second:
        # The restarted sandbox knows the import and the send, and does not send again.
        status, send = await api(second, "GET", f"/sends/{created['send_id']}")
        assert (status, send["external_id"]) == (200, "job-x")
        status, again = await api(second, "POST", "/sends", body)
        assert (status, again["send_id"]) == (200, created["send_id"])
        assert (await api(second, "GET", f"/imports/{done['import_id']}"))[1]["state"] == "done"

        manifest = await second.complete_manifest("job-x", timeout_s=60)
        _, stats = await api(second, "GET", "/_sandbox/stats")
        assert stats["sends_created"] == {"job-x": 1}
        assert (await api(second, "GET", f"/sends/{created['send_id']}"))[1]["state"] == "sent"
        assert second.stop() == 0

    assert manifest["counts"] == expected["counts"]
    assert len(manifest["files"]) == len(expected["files"])
    assert f"responses/{archived}" in manifest["files"]
    events = read_events(
        account_dir, [f.replace(f"responses/{archived}", f"archive/{archived}") for f in manifest["files"]]
    )
    assert len({e["EventId"] for e in events}) == len(events)
    counts = Counter(e["EventType"] for e in events)
    assert manifest["counts"] == {t: counts.get(t, 0) for t in EVENT_TYPES}
    assert response_files(second) == sorted(
        n.removeprefix("responses/") for n in manifest["files"] if archived not in n
    )

    def outcome(evs: list[dict[str, str]]) -> Counter[tuple[str, str, str]]:
        return Counter((e["EventType"], e["CommunicationKey"], e["Url"]) for e in evs)

    assert outcome(events) == outcome(expected_events)
    after = file_ids([*(account_dir / "responses").iterdir(), account_dir / "archive" / archived])
    if sig is signal.SIGTERM:
        # Files written before the stop were kept as they were, not written again.
        assert {n: after[n] for n in before} == before


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
async def test_every_flavor_answers_its_stats_and_stops_cleanly_on_sigint(
    sandbox: Sandboxes, flavor: str
) -> None:
    with sandbox(flavor) as esp:
        assert (await esp.stats())["sends_created"] == {}
        assert esp.stop(signal.SIGINT) == 0
    assert '"msg":"stopped"' in esp.log_text()
