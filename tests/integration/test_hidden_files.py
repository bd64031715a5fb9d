"""Hidden files on the ESP's SFTP site, against the real sshd: a hidden response file is left alone
while young and reported once when old (dead letter, ledger row, log line, metric), never read
nor removed; espbridge's own stale partial uploads are removed from the list folders, nothing
else is. Files are made old by moving their mtime back on the site's local root, not by waiting.
"""

from __future__ import annotations

import asyncio
import logging
import os
import posixpath
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from faststream.kafka import KafkaBroker

from shared.esp import AccountsSettings, Connector
from shared.esp.resources import EspResources
from shared.infra.db import connect, create_pool
from shared.infra.health import Metrics
from shared.infra.sftp import partial_upload_name
from shared.model.messages import DeadLetter, ResponseFile
from shared.model.topics import Topic
from shared.operations.gathering import scan
from shared.operations.jobs import build_job
from tests.fixtures.deployment import Deployment
from tests.fixtures.kafka import count_records, read_until
from tools.demo import FLAVORS, demo_job

GRACE_S = 600.0
OLD_S = 2 * GRACE_S


def age(path: Path, seconds: float) -> Path:
    """Make a file on the site look unchanged for ``seconds`` (its mtime moved back)."""
    past = time.time() - seconds
    os.utime(path, (past, past))
    return path


def put(folder: Path, name: str, old: bool) -> Path:
    """A file written on the site, old (unchanged for twice the grace) or just written."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("Email,Type\nx@example.com,open\n")
    return age(path, OLD_S) if old else path


@dataclass
class Gatherers:
    """What a gatherer process scans with, opened once; each :meth:`scan` is one process's scan."""

    esp: EspResources
    deployment: Deployment
    pool: asyncpg.Pool
    broker: KafkaBroker

    def connector(self, esp: str) -> Connector:
        """The connector of this deployment's account at ``esp``."""
        return self.esp.connectors.get(esp, self.deployment.account)

    async def scan(self, metrics: Metrics, swept: dict[str, float] | None = None) -> list[ResponseFile]:
        """One scan as a freshly started gatherer makes it (nothing remembered in memory), or, with
        ``swept``, as one scanning on an interval."""
        return await scan(
            self.esp.connectors,
            self.esp.sftp,
            self.pool,
            self.broker,
            self.deployment.kafka,
            hidden_grace_s=GRACE_S,
            metrics=metrics,
            swept=swept,
        )


@pytest.fixture
async def gatherers(deployment: Deployment) -> AsyncIterator[Gatherers]:
    """An account of every connector for this test, and what a gatherer scans them with."""
    entries = [deployment.offline_account(esp, deployment.account) for esp in FLAVORS]
    accounts = AccountsSettings(accounts_file=deployment.accounts_file(entries))
    async with AsyncExitStack() as stack:
        esp = await EspResources.open(stack, accounts, deployment.servers.sftp)
        pool = await create_pool(deployment.database)
        stack.push_async_callback(pool.close)
        broker = KafkaBroker(deployment.kafka.bootstrap_servers)
        await broker.start()
        stack.push_async_callback(broker.stop)
        yield Gatherers(esp, deployment, pool, broker)


def site(deployment: Deployment, remote: str) -> Path:
    """A remote folder of the SFTP site on local disk."""
    return deployment.servers.sftp_local_root / remote


def logged(caplog: pytest.LogCaptureFixture, message: str) -> list[str]:
    """The files named by the log lines that start with ``message``."""
    return [str(getattr(r, "file", "")) for r in caplog.records if r.getMessage().startswith(message)]


async def test_an_old_hidden_response_file_is_reported_once_and_a_young_one_left_alone(
    gatherers: Gatherers, deployment: Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shared.operations.gathering")
    responses = f"sandbox/{deployment.account}/responses"
    old = put(site(deployment, responses), ".opens-0401.csv", old=True)
    young = put(site(deployment, responses), ".opens-0402.csv", old=False)
    stuck = put(site(deployment, responses), "clicks-0401.csv.partial", old=True)
    reported = {f"{responses}/{p.name}" for p in (old, stuck)}

    # Two gatherers scanning at once, then one started later: each old file reported once.
    two = [Metrics("gatherer"), Metrics("gatherer")]
    announced = await asyncio.gather(*(gatherers.scan(m) for m in two))
    later = Metrics("gatherer")
    announced.append(await gatherers.scan(later))

    assert announced == [[], [], []], "a hidden file was announced to be read"
    records = await read_until(deployment.kafka, Topic.DEADLETTER, lambda rs: len(rs) >= 2)
    assert await count_records(deployment.kafka, Topic.DEADLETTER) == 2
    letters = [DeadLetter.from_json(r.value or b"") for r in records]
    assert {d.source.name for d in letters} == reported
    assert {(d.source.kind, d.error_class, d.service) for d in letters} == {
        ("file", "HiddenResponseFile", "gatherer")
    }
    assert all(d.context == {"esp": "sandbox", "account": deployment.account} for d in letters)
    assert all("rename it on the ESP's site" in d.message for d in letters)

    conn = await connect(deployment.database)
    try:
        rows = await conn.fetch("SELECT path, state, error FROM control.gathered_files ORDER BY path")
    finally:
        await conn.close()
    assert {r["path"] for r in rows} == reported
    assert {r["state"] for r in rows} == {"failed"}
    assert all("not ready" in r["error"] for r in rows)

    assert sorted(logged(caplog, "hidden response file")) == sorted(reported)
    counted = [m.value("hidden_files_reported_total", esp="sandbox") for m in [*two, later]]
    assert sum(counted) == 2
    assert counted[2] == 0, "the gatherer started later reported a file again"
    assert [p.name for p in (old, young, stuck) if not p.exists()] == [], "a hidden file was removed"


async def test_a_hidden_response_file_changed_again_is_reported_again(
    gatherers: Gatherers, deployment: Deployment
) -> None:
    responses = f"sandbox/{deployment.account}/responses"
    hidden = put(site(deployment, responses), ".bounces.csv", old=True)
    await gatherers.scan(Metrics("gatherer"))
    hidden.write_text("Email,Type\nx@example.com,bounce_hard\ny@example.com,bounce_soft\n")
    await gatherers.scan(Metrics("gatherer"))  # changed within the grace: an upload again
    assert await count_records(deployment.kafka, Topic.DEADLETTER) == 1
    age(hidden, OLD_S)
    await gatherers.scan(Metrics("gatherer"))
    assert await count_records(deployment.kafka, Topic.DEADLETTER) == 2


async def test_stale_partial_uploads_of_espbridge_are_removed_and_nothing_else(
    gatherers: Gatherers, deployment: Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shared.operations.gathering")
    stale: dict[str, Path] = {}
    kept: list[Path] = []
    for esp, flavor in FLAVORS.items():
        # Where the uploader writes this account's lists, and the temporary name it writes first.
        job = build_job(demo_job(f"job-{esp}", esp, deployment.account, flavor.mode))
        remote = partial_upload_name(gatherers.connector(esp).list_path(job))
        folder = site(deployment, posixpath.dirname(remote))
        stale[esp] = put(folder, posixpath.basename(remote), old=True)
        kept.append(put(folder, posixpath.basename(partial_upload_name(f"young-{esp}.csv")), old=False))
        kept.append(put(folder, f".{esp}-notes.csv", old=True))  # someone else's hidden file
        kept.append(put(folder, f".{esp}.csv.ABCDEF012345.partial", old=True))  # not our form exactly
        kept.append(put(folder, f"{esp}.csv.0123456789ab.partial", old=True))  # no leading dot

    two = [Metrics("gatherer"), Metrics("gatherer")]
    await asyncio.gather(*(gatherers.scan(m) for m in two))  # both may try to remove a file

    assert [esp for esp, path in stale.items() if path.exists()] == []
    assert [p.name for p in kept if not p.exists()] == []
    removed = [str(p.relative_to(deployment.servers.sftp_local_root)) for p in stale.values()]
    assert sorted(logged(caplog, "stale partial upload removed")) == sorted(removed)
    for esp in FLAVORS:
        assert sum(m.value("stale_partials_removed_total", esp=esp) for m in two) == 1
    assert await count_records(deployment.kafka, Topic.DEADLETTER) == 0, "a list folder's file was reported"


async def test_a_gatherer_on_an_interval_sweeps_a_list_folder_once_per_quarter_of_the_grace(
    gatherers: Gatherers, deployment: Deployment
) -> None:
    esp = "sandbox"
    job = build_job(demo_job("job-sweep", esp, deployment.account, FLAVORS[esp].mode))
    remote = partial_upload_name(gatherers.connector(esp).list_path(job))
    folder = site(deployment, posixpath.dirname(remote))
    first = put(folder, posixpath.basename(remote), old=True)
    swept: dict[str, float] = {}
    metrics = Metrics("gatherer")
    await gatherers.scan(metrics, swept)
    assert not first.exists()
    second = put(folder, posixpath.basename(partial_upload_name(remote)), old=True)
    await gatherers.scan(metrics, swept)  # the next scan, within a quarter of the grace
    assert second.exists(), "the list folder was listed again on the very next scan"
    for drop in swept:  # as if a quarter of the grace had passed since
        swept[drop] -= GRACE_S / 4
    await gatherers.scan(metrics, swept)
    assert not second.exists()
    assert metrics.value("stale_partials_removed_total", esp=esp) == 2
