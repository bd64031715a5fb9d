"""The bench's data, made here and reproducible from a seed.

* Response files in the generic ESP's format (docs/generic-esp.md, the default ``sandbox`` ESP):
  per broadcast one file per phase (sent, delivery, opens, clicks, optouts), with the funnel of a
  real newsletter — every recipient sent, most delivered, some bounced, a third opening (some
  more than once), fewer clicking tracked links, a few unsubscribing or complaining.
* The same events as rows of ``responses.events`` (CSV for psql ``\\copy``: the limit), with the
  event ids, sources and NULLs the pipeline gives them.
* One large clicks file with long tracking links, for the memory bench.

The rows are written from the ESP's documentation, not from the connector's code, so a
disagreement shows up as a failed bench (and in the unit test) rather than being agreed on; only
the header's column names are the connector's own constant.
"""

from __future__ import annotations

import csv
import math
import posixpath
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

from services.loader.core import COLUMNS as LOADED_COLUMNS
from shared.esp.generic import RESPONSE_HEADER
from shared.model.messages import event_id_for

HEADER = RESPONSE_HEADER
PHASES = ("sent", "delivery", "opens", "clicks", "optouts")
LIMIT_COLUMNS = tuple(c for c in LOADED_COLUMNS if c != "extra")
"""The columns of responses.events the limit CSV fills (extra stays NULL, loaded_at its default)."""

# The funnel, per recipient (delivered ones for opens and clicks).
P_BOUNCE_HARD = 0.015
P_BOUNCE_SOFT = 0.035
P_OPEN = 0.35
P_CLICK = 0.12
P_UNSUBSCRIBE = 0.004
P_COMPLAINT = 0.0005
EVENTS_PER_RECIPIENT = 2.65
"""About how many events one recipient makes with the funnel above (sent, delivery, opens, clicks)."""

Row = tuple[str, str, str, str, str, str, str, str]


@dataclass(frozen=True, slots=True)
class Broadcast:
    """One broadcast of the bench: the job id (the ESP's BroadcastId), its send id and message."""

    job_id: str
    send_id: str
    message: str
    recipients: int
    sent_at: datetime


@dataclass(frozen=True, slots=True)
class ResponseFile:
    """A response file written by the bench."""

    name: str
    broadcast_id: str
    rows: int
    bytes: int


def plan_broadcasts(token: str, total_events: int, broadcasts: int, start: datetime) -> list[Broadcast]:
    """Broadcasts whose responses add up to about ``total_events`` events."""
    recipients = max(1, round(total_events / broadcasts / EVENTS_PER_RECIPIENT))
    return [
        Broadcast(
            job_id=f"bench-{token}-b{i:02d}",
            send_id=f"snd-{token}{i:02d}",
            message=f"newsletter-{i:02d}",
            recipients=recipients,
            sent_at=start + timedelta(hours=i),
        )
        for i in range(broadcasts)
    ]


def _when(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _customer(n: int) -> tuple[str, str]:
    """(communication key, email) of customer ``n``, as tools.demo.seed_customers makes them."""
    return f"ck-{n:09d}", f"customer{n}@example.com"


def tracking_url(rng: random.Random, n: int, campaign: str) -> str:
    """A clicked link with the campaign's tracking parameters."""
    section = rng.choice(("sale", "new", "men", "women", "home"))
    return (
        f"https://shop.example.com/{section}/p/{rng.randrange(10**6)}"
        f"?utm_source=newsletter&utm_medium=email&utm_campaign={campaign}&utm_content=link{rng.randrange(12)}"
    )


def _pool(rng: random.Random, alphabet: str, length: int, size: int = 997) -> list[str]:
    return ["".join(rng.choices(alphabet, k=length)) for _ in range(size)]


def broadcast_rows(b: Broadcast, seed: int) -> Iterator[tuple[str, Row]]:
    """(phase, row) of every response event of a broadcast, phase by phase as the ESP writes them."""
    rng = random.Random(f"{seed}:{b.job_id}")
    seq = 0

    def row(n: int, kind: str, at: datetime, url: str = "") -> Row:
        nonlocal seq
        seq += 1
        key, email = _customer(n)
        return (f"{b.send_id}-{seq:08d}", b.job_id, b.message, key, email, kind, url, _when(at))

    customers = range(1, b.recipients + 1)
    for n in customers:
        yield "sent", row(n, "sent", b.sent_at + timedelta(seconds=n // 200))
    delivered = bytearray(b.recipients + 1)
    for n in customers:
        draw = rng.random()
        at = b.sent_at + timedelta(seconds=n // 200 + rng.randrange(2, 90))
        if draw < P_BOUNCE_HARD:
            yield "delivery", row(n, "bounce_hard", at)
        elif draw < P_BOUNCE_HARD + P_BOUNCE_SOFT:
            yield "delivery", row(n, "bounce_soft", at)
        else:
            delivered[n] = 1
            yield "delivery", row(n, "delivered", at)
    for n in customers:
        if delivered[n] and rng.random() < P_OPEN:
            for _ in range(1 + int(rng.random() < 0.4) + int(rng.random() < 0.1)):
                yield "opens", row(n, "open", b.sent_at + timedelta(seconds=rng.randrange(60, 3 * 86400)))
    for n in customers:
        if delivered[n] and rng.random() < P_CLICK:
            for _ in range(1 + int(rng.random() < 0.3)):
                at = b.sent_at + timedelta(seconds=rng.randrange(120, 3 * 86400))
                yield "clicks", row(n, "click", at, tracking_url(rng, n, b.message))
    for n in customers:
        if delivered[n]:
            draw = rng.random()
            at = b.sent_at + timedelta(seconds=rng.randrange(300, 5 * 86400))
            if draw < P_UNSUBSCRIBE:
                yield "optouts", row(n, "unsubscribe", at)
            elif draw < P_UNSUBSCRIBE + P_COMPLAINT:
                yield "optouts", row(n, "complaint", at)


def file_name(b: Broadcast, seq: int, phase: str) -> str:
    """``<send_id>_<seq 3 digits>_<phase>.csv`` as the ESP names its response files."""
    return f"{b.send_id}_{seq:03d}_{phase}.csv"


def limit_row(esp: str, account: str, remote_path: str, line: int, row: Row) -> list[str]:
    """The row of responses.events the pipeline makes of a response row (CSV: empty = NULL): the
    event id made from the ESP's, the account, the row's other values, and where it came from."""
    esp_event_id, *values = row
    event_id = str(event_id_for(esp, esp_event_id=f"{account}:{esp_event_id}"))
    return [event_id, esp, account, *values, f"file:{posixpath.normpath(remote_path)}:{line}"]


def write_response_files(
    folder: Path,
    broadcasts: list[Broadcast],
    seed: int,
    esp: str,
    account: str,
    remote_folder: str,
    limit_csv: IO[str] | None = None,
) -> list[ResponseFile]:
    """Write every broadcast's response files into ``folder`` (and, if given, the same events as
    responses.events rows into ``limit_csv``); returns the files."""
    files: list[ResponseFile] = []
    limit = csv.writer(limit_csv, lineterminator="\n") if limit_csv is not None else None
    for b in broadcasts:
        current: _OpenFile | None = None
        seq = 0
        for phase, row in broadcast_rows(b, seed):
            if current is None or current.phase != phase:
                if current is not None:
                    files.append(current.close())
                seq += 1
                current = _OpenFile(folder, b, file_name(b, seq, phase), phase)
            current.write(row)
            if limit is not None:
                limit.writerow(
                    limit_row(esp, account, f"{remote_folder}/{current.name}", current.rows + 1, row)
                )
        if current is not None:
            files.append(current.close())
    return files


class _OpenFile:
    """A response file being written: header first, then rows."""

    def __init__(self, folder: Path, b: Broadcast, name: str, phase: str) -> None:
        self.path = folder / name
        self.name = name
        self.phase = phase
        self.broadcast_id = b.job_id
        self.rows = 0
        self._out = self.path.open("w", encoding="utf-8", newline="")
        self._writer = csv.writer(self._out, lineterminator="\n")
        self._writer.writerow(HEADER)

    def write(self, row: Row) -> None:
        self._writer.writerow(row)
        self.rows += 1

    def close(self) -> ResponseFile:
        self._out.close()
        return ResponseFile(self.name, self.broadcast_id, self.rows, self.path.stat().st_size)


def write_clicks_file(path: Path, b: Broadcast, target_bytes: int, seed: int) -> ResponseFile:
    """One clicks file of at least ``target_bytes`` whose links carry the redirect wrapper and
    signature some ESPs add (several hundred characters each): the memory bench's large file."""
    rng = random.Random(f"{seed}:{path.name}")
    tokens = _pool(rng, "abcdefghijklmnopqrstuvwxyz0123456789", 48)
    signatures = _pool(rng, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", 420)
    rows = 0
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(HEADER)
        while out.tell() < target_bytes:
            for _ in range(1000):
                rows += 1
                n = 1 + rows % max(1, b.recipients)
                key, email = _customer(n)
                target = tracking_url(rng, n, b.message)
                quoted = (
                    target.replace(":", "%3A").replace("/", "%2F").replace("?", "%3F").replace("&", "%26")
                )
                url = (
                    f"https://links.example.net/c/{tokens[rows % 997]}?r={n}&u={quoted}"
                    f"&sig={signatures[(rows * 7) % 997]}"
                )
                at = _when(b.sent_at + timedelta(seconds=rows // 10))
                writer.writerow(
                    (f"{b.send_id}-{rows:010d}", b.job_id, b.message, key, email, "click", url, at)
                )
    return ResponseFile(path.name, b.job_id, rows, path.stat().st_size)


def customers_for(selected: int, opted_out_every: int = 33) -> int:
    """How many customers tools.demo.seed_customers must make so that ``selected`` are not opted out
    (it opts out every ``opted_out_every``-th)."""
    total = selected + selected // (opted_out_every - 1)
    while total - total // opted_out_every < selected:
        total += 1
    return total


def now_utc() -> datetime:
    """Now, to the second (response times are written to the second)."""
    return datetime.now(UTC).replace(microsecond=0)


def expected_events(broadcasts: int, recipients: int) -> int:
    """Roughly the events ``broadcasts`` of ``recipients`` each make (for planning time limits)."""
    return math.ceil(broadcasts * recipients * EVENTS_PER_RECIPIENT)
