"""The sandbox ESP's ``generic_sftp`` flavor as a client sees it (docs/connectors/generic_sftp.md).

No API: a list file dropped in ``drop/`` is imported and sent by the sandbox itself, and FERG-style
response files appear in ``responses/``. The tests read and write the sandbox's root the way the
SFTP server would serve it, and use only the test-support ``_sandbox/stats`` over HTTP.
"""

from __future__ import annotations

import csv
import io
import re
import signal
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sandbox.protocol import EventType
from sandbox.simulate import Event, distinct_seconds
from tests.fixtures.sandbox import EVENT_TYPES, SandboxClient, Sandboxes, file_ids
from tests.fixtures.waits import wait_for

FLAVOR = "generic_sftp"
# The FERG header as docs/connectors/generic_sftp.md documents it, written out here.
HEADER = [
    "MessageType",
    "urn",
    "email",
    "mailingId",
    "mailingName",
    "timestamp",
    "link",
    "bouncetype",
    "bouncereason",
]
NAME_RE = re.compile(r"^\d{14}_FERGE_(?P<kind>sents|bounces|opens|clicks|unsubscribes)(_\d{3})?\.txt$")
KIND_TYPES = {
    "sents": {"Send"},
    "bounces": {"Bounce"},
    "opens": {"Open"},
    "clicks": {"Click"},
    "unsubscribes": {"Unsubscription"},
}
# The manifest's event type for a row: the doc's mapping to espbridge event types.
EVENT_TYPE = {
    ("Send", ""): "sent",
    ("Bounce", "hardbounce"): "bounce_hard",
    ("Bounce", "softbounce"): "bounce_soft",
    ("Open", ""): "open",
    ("Click", ""): "click",
    ("Unsubscription", ""): "unsubscribe",
}


# Helpers


def tsv(rows: Sequence[Sequence[str]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, delimiter="\t", lineterminator="\n").writerows(rows)
    return buffer.getvalue().encode()


def drop_list(esp: SandboxClient, name: str, rows: Sequence[Sequence[str]]) -> None:
    """Upload a list file as espbridge does: under a hidden name, then renamed."""
    esp.upload(f"drop/{name}", tsv(rows))


def recipients(count: int, prefix: str = "k") -> list[list[str]]:
    """A header and ``count`` valid recipients, with attributes that need quoting."""
    rows = [["Email", "CommunicationKey", "FirstName"]]
    rows += [[f"user{i}@example.com", f"{prefix}{i}", f'Name "{i}"\tJr.\nline two'] for i in range(count)]
    return rows


def read_rows(account_dir: Path, files: Sequence[str]) -> list[dict[str, str]]:
    """All rows of the given response files (as a tab-delimited csv reader sees them), header checked."""
    rows: list[dict[str, str]] = []
    for name in files:
        with (account_dir / name).open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t")
            assert next(reader) == HEADER, name
            rows += [dict(zip(HEADER, row, strict=True)) for row in reader]
    return rows


def counts_of(rows: list[dict[str, str]]) -> dict[str, int]:
    counts = Counter(EVENT_TYPE[r["MessageType"], r["bouncetype"]] for r in rows)
    return {t: counts.get(t, 0) for t in EVENT_TYPES}


def response_files(esp: SandboxClient) -> list[str]:
    return sorted(p.name for p in (esp.account_dir() / "responses").iterdir())


# Tests


async def test_a_dropped_list_is_sent_and_answered_in_ferg_files(sandbox: Sandboxes, tmp_path: Path) -> None:
    rows = recipients(150)
    rows += [
        ["no-at-sign.example.com", "bad1", "x"],
        ["", "bad2", "x"],
        ["nokey@example.com", "", "x"],
        ["again@example.com", "k1", "x"],  # k1 is in the list already
        ["short@example.com", "bad3"],  # a field short
    ]
    # Opens and clicks in plenty, so same-second repeats of one recipient are likely.
    settings = {
        "rows_per_file": "25",
        "rate_open": "1",
        "rate_click": "1",
        "rate_unsubscribe": "0.3",
    }
    with sandbox(FLAVOR, **settings) as esp:
        drop = esp.account_dir() / "drop"
        # An upload in progress, and a file that is not a list: neither is touched.
        (drop / ".x.txt.partial").write_bytes(tsv(recipients(3, "x")))
        (drop / "notes.csv").write_bytes(b"Email,CommunicationKey\na@example.com,n1\n")
        started = int(time.time())
        drop_list(esp, "job-1.txt", rows)
        manifest = await esp.complete_manifest("job-1")
        assert await esp.stats() == {
            "sends_created": {"job-1": 1},
            "sends_cancelled": {},
            "imports_created": {"job-1": 1},
            "calls_per_second": {},  # no API: nothing to call
        }
        # Without the token, the test-support API is closed as in every flavor.
        async with esp.http.get(esp.api() + "/_sandbox/stats") as resp:
            assert resp.status == 401
        async with esp.http.post(esp.api() + "/imports", headers=esp.headers, json={}) as resp:
            assert resp.status == 404, "this flavor has no REST API"
        assert esp.stop() == 0
    finished = int(time.time())

    names = response_files(esp)
    assert {f"responses/{n}" for n in names} == set(manifest["files"])
    assert len(names) == len(manifest["files"]), "a response file was listed twice or overwritten"
    kinds = [NAME_RE.fullmatch(n) for n in names]
    assert all(kinds), names
    assert any("_FERGE_sents_0" in n for n in names), "several files of one second need distinct names"
    for name in names:
        in_file = read_rows(esp.account_dir(), [f"responses/{name}"])
        kind = NAME_RE.fullmatch(name)
        assert kind is not None
        assert 0 < len(in_file) <= 25
        assert {r["MessageType"] for r in in_file} <= KIND_TYPES[kind["kind"]], name

    events = read_rows(esp.account_dir(), manifest["files"])
    assert counts_of(events) == manifest["counts"]
    assert manifest["counts"]["delivered"] == manifest["counts"]["complaint"] == 0
    assert manifest["counts"]["sent"] == manifest["recipients"] == 150
    assert manifest["counts"]["bounce_hard"] + manifest["counts"]["bounce_soft"] > 0
    assert manifest["counts"]["click"] > 0
    assert manifest["counts"]["unsubscribe"] > 0
    assert sorted(p.name for p in (esp.account_dir() / "manifest").iterdir()) == ["job-1.json"]
    assert (esp.account_dir() / "drop" / ".x.txt.partial").exists()

    # The consumer derives event ids from (urn, type, link, second): never two rows alike.
    identities = Counter((r["urn"], r["MessageType"], r["link"], r["timestamp"]) for r in events)
    assert [k for k, n in identities.items() if n > 1] == []

    emails = {f"k{i}": f"user{i}@example.com" for i in range(150)}
    sent_at: dict[str, int] = {}
    for r in events:
        assert r["urn"] in emails, "an invalid row was sent"
        assert r["email"] == emails[r["urn"]]
        assert (r["mailingId"], r["mailingName"]) == ("job-1", "job-1")
        assert r["timestamp"].isdigit()
        assert started - 1 <= int(r["timestamp"]) <= finished + 2 * 86400
        assert bool(r["link"]) == (r["MessageType"] == "Click")
        assert r["link"].startswith("https://") or not r["link"]
        assert bool(r["bouncetype"]) == bool(r["bouncereason"]) == (r["MessageType"] == "Bounce")
        if r["MessageType"] == "Send":
            sent_at[r["urn"]] = int(r["timestamp"])
    assert set(sent_at) == set(emails)
    assert all(int(r["timestamp"]) >= sent_at[r["urn"]] for r in events)
    reasons = {r["bouncereason"] for r in events if r["bouncetype"] == "hardbounce"}
    assert reasons == {'550 5.1.1 "user unknown"'}, "a quoted field did not read back"


def test_repeats_in_one_second_move_on() -> None:
    """Too rare to count on in a small list: what the FERG writer does with a same-second repeat."""
    url = "https://example.com/a"
    events = [
        Event(1, EventType.OPEN, "a@x.org", "k1", "", 100),
        Event(2, EventType.OPEN, "a@x.org", "k1", "", 100),
        Event(3, EventType.OPEN, "a@x.org", "k1", "", 101),
        Event(4, EventType.CLICK, "a@x.org", "k1", url, 100),
        Event(5, EventType.CLICK, "a@x.org", "k1", "https://example.com/b", 100),
        Event(6, EventType.OPEN, "b@x.org", "k2", "", 100),
    ]
    moved = [(e.number, e.at) for e in distinct_seconds(events)]
    assert moved == [(1, 100), (2, 101), (3, 102), (4, 100), (5, 100), (6, 100)]


async def test_a_restarted_sandbox_sends_a_file_only_once(sandbox: Sandboxes, tmp_path: Path) -> None:
    root = tmp_path / "sftp"
    token = "restart-token"
    with sandbox(FLAVOR, root=root, token=token) as first:
        drop_list(first, "job-a.txt", recipients(20))
        before = await first.complete_manifest("job-a")
        assert first.stop() == 0
    written = file_ids((first.account_dir() / "responses").iterdir())

    with sandbox(FLAVOR, root=root, token=token) as second:
        # A new list after the restart: by the time it is answered, job-a was seen again in drop/.
        drop_list(second, "job-b.txt", recipients(10, "b"))
        await second.complete_manifest("job-b")
        assert await second.stats() == {
            "sends_created": {"job-a": 1, "job-b": 1},
            "sends_cancelled": {},
            "imports_created": {"job-a": 1, "job-b": 1},
            "calls_per_second": {},  # no API: nothing to call
        }
        assert second.stop() == 0
    assert second.manifest("job-a") == before
    after = file_ids((second.account_dir() / "responses").iterdir())
    assert {n: after[n] for n in written} == written, "job-a's response files were written again"


async def test_a_send_killed_midway_resumes_without_duplicates(sandbox: Sandboxes, tmp_path: Path) -> None:
    rows = recipients(200)
    settings = {"seed": "7", "rows_per_file": "40"}
    token = "kill-token"

    # The reference: the same list, seed and mailingId, uninterrupted, on another root.
    with sandbox(FLAVOR, root=tmp_path / "ref" / "sftp", token=token, **settings) as ref:
        drop_list(ref, "job-k.txt", rows)
        expected = await ref.complete_manifest("job-k")
        expected_rows = read_rows(ref.account_dir(), expected["files"])
        assert ref.stop() == 0

    root = tmp_path / "run" / "sftp"
    with sandbox(FLAVOR, root=root, token=token, **{**settings, "phase_delay_s": "1.0"}) as first:
        drop_list(first, "job-k.txt", rows)

        def some_files() -> dict[str, Any] | None:
            manifest = first.manifest("job-k")
            return manifest if manifest is not None and manifest["files"] else None

        await wait_for(some_files, 15, 0.02, what="the first response files")
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    interrupted = first.manifest("job-k")
    assert interrupted is not None
    assert not interrupted["complete"], "the send finished before the kill; nothing was resumed"
    before = file_ids((first.account_dir() / "responses").iterdir())

    with sandbox(FLAVOR, root=root, token=token, **settings) as second:
        manifest = await second.complete_manifest("job-k")
        assert (await second.stats())["sends_created"] == {"job-k": 1}
        assert second.stop() == 0

    assert manifest["counts"] == expected["counts"]
    assert len(manifest["files"]) == len(expected["files"])
    assert set(response_files(second)) == {f.removeprefix("responses/") for f in manifest["files"]}
    events = read_rows(second.account_dir(), manifest["files"])
    assert counts_of(events) == manifest["counts"]
    identities = Counter((r["urn"], r["MessageType"], r["link"], r["timestamp"]) for r in events)
    assert [k for k, n in identities.items() if n > 1] == []

    def outcome(evs: list[dict[str, str]]) -> Counter[tuple[str, str, str, str]]:
        return Counter((e["MessageType"], e["bouncetype"], e["urn"], e["link"]) for e in evs)

    assert outcome(events) == outcome(expected_rows)
    after = file_ids((second.account_dir() / "responses").iterdir())
    assert {n: after[n] for n in before if not n.startswith(".")} == {
        n: v for n, v in before.items() if not n.startswith(".")
    }
