"""The ``espbridge job`` and ``espbridge gather`` commands' work (the CLI module parses arguments)."""

from __future__ import annotations

import getpass
import secrets
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from aiokafka import AIOKafkaConsumer
from faststream.kafka import KafkaBroker
from pydantic import ValidationError

from shared.db import connect, create_pool
from shared.errors import ConfigurationError, InvalidMessageError
from shared.esp import Accounts, AccountsSettings, ConnectorContext, Connectors
from shared.gathering import pull_api, scan
from shared.kafka import ensure_topics, publish
from shared.messages import BroadcastJob, BroadcastStatus, ResponseFile
from shared.settings import KafkaSettings, PostgresSettings, SftpSettings
from shared.sftp import SftpPool
from shared.topics import Topic

FUNNEL = ("sent", "delivered", "bounce_hard", "bounce_soft", "opens", "clicks", "unsubscribes", "complaints")


def new_job_id() -> str:
    """A readable unique job id: ``job-20261122-093000-1a2b3c``."""
    return f"job-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def build_job(document: dict[str, Any]) -> BroadcastJob:
    """A job from a YAML/JSON document, filling job_id, created_at and requested_by if absent."""
    data = dict(document)
    data.setdefault("job_id", new_job_id())
    data.setdefault("created_at", datetime.now(UTC).isoformat())
    data.setdefault("requested_by", getpass.getuser())
    try:
        return BroadcastJob.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in e['loc']) or '(job)'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidMessageError(f"the job is not valid:\n{problems}") from None


def read_document(path: Path) -> dict[str, Any]:
    """A job file: JSON or YAML, a mapping at the top."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = orjson.loads(raw) if path.suffix == ".json" else yaml.safe_load(raw)
    except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
        raise InvalidMessageError(
            f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise InvalidMessageError(f"{path} must hold one job (a mapping)")
    return data


async def publish_job(kafka: KafkaSettings, job: BroadcastJob) -> None:
    """Publish a job to broadcast.jobs.v1 (creating the topics if needed)."""
    await ensure_topics(kafka)
    broker = KafkaBroker(kafka.bootstrap_servers, client_id=f"{kafka.client_id}-cli")
    await broker.start()
    try:
        await publish(broker, kafka, job)
    finally:
        await broker.stop()


async def read_statuses(kafka: KafkaSettings, job_id: str) -> list[BroadcastStatus]:
    """Every status of a job on broadcast.status.v1, from the beginning up to now."""
    topic = kafka.topic(Topic.BROADCAST_STATUS)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        parts = list(consumer.assignment())  # without a group, every partition of the topic
        if not parts:
            return []
        ends = await consumer.end_offsets(parts)
        key = job_id.encode()
        out: list[BroadcastStatus] = []
        pending = {tp for tp in parts if ends[tp] > 0}
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    if record.key == key and record.value:
                        out.append(BroadcastStatus.from_json(record.value))
                    if record.offset + 1 >= ends[tp]:
                        pending.discard(tp)
        return sorted(out, key=lambda s: s.at)
    finally:
        await consumer.stop()


async def funnel(pg: PostgresSettings, broadcast_id: str) -> dict[str, int] | None:
    """A broadcast's response funnel from responses.broadcast_funnel (None if nothing loaded)."""
    conn = await connect(pg)
    try:
        row = await conn.fetchrow(
            "SELECT * FROM responses.broadcast_funnel WHERE broadcast_id = $1", broadcast_id
        )
    finally:
        await conn.close()
    return None if row is None else {k: int(row[k]) for k in FUNNEL}


def summarize(statuses: Sequence[BroadcastStatus]) -> list[tuple[BroadcastStatus, int]]:
    """The statuses a person reads: every change of stage or state, with repeated progress
    updates of one stage and state (gather and load report per file and batch) folded into the
    latest one and counted."""
    out: list[tuple[BroadcastStatus, int]] = []
    index: dict[tuple[str, str], int] = {}
    for s in statuses:
        key = (s.stage.value, s.state.value)
        if key in index and s.state.value == "running":
            i = index[key]
            out[i] = (s, out[i][1] + 1)
        else:
            index[key] = len(out)
            out.append((s, 1))
    return out


def format_statuses(statuses: Sequence[BroadcastStatus]) -> str:
    """Statuses as an aligned table, progress updates folded (see :func:`summarize`)."""
    lines = [f"{'at':<24} {'stage':<7} {'state':<9} {'service':<9} detail"]
    for s, n in summarize(statuses):
        counts = " ".join(f"{k}={v}" for k, v in s.counts.items())
        detail = f"{s.detail} {counts}".strip() + (f" ({n} updates, latest shown)" if n > 1 else "")
        lines.append(
            f"{s.at:%Y-%m-%d %H:%M:%S.%f}"[:23].ljust(24)
            + f" {s.stage:<7} {s.state:<9} {s.service:<9} {detail}"
        )
    return "\n".join(lines)


async def gather_now(
    kafka: KafkaSettings, pg: PostgresSettings, sftp: SftpSettings, accounts: AccountsSettings
) -> list[ResponseFile]:
    """One scan of every configured account, announcing new response files to the gatherers."""
    configured = Accounts.load(accounts)
    await ensure_topics(kafka)
    pool = await create_pool(pg)
    sftp_pool = SftpPool(sftp)
    broker = KafkaBroker(kafka.bootstrap_servers, client_id=f"{kafka.client_id}-cli")
    await broker.start()
    try:
        async with aiohttp.ClientSession() as http:
            connectors = Connectors(configured, ConnectorContext(http, sftp_pool))
            files = await scan(connectors, sftp_pool, pool, broker, kafka, republish_after_s=0.0)
            await pull_api(connectors, pool, broker, kafka, service="cli")
            return files
    finally:
        await broker.stop()
        await sftp_pool.close()
        await pool.close()
