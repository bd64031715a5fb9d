"""Broadcast jobs from the outside: building one from a document, publishing it, following it.

Used by the CLI (``espbridge job …``), the demo and the tests; services never need these.
"""

from __future__ import annotations

import getpass
import secrets
from datetime import UTC, datetime
from typing import Any

from faststream.kafka import KafkaBroker
from pydantic import ValidationError

from shared.infra.db import connect, responses
from shared.infra.kafka import ensure_topics, publish, read_topic
from shared.infra.settings import KafkaSettings, PostgresSettings
from shared.model.errors import InvalidMessageError
from shared.model.messages import BroadcastJob, BroadcastStatus
from shared.model.topics import Topic


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
    """Every status of a job on broadcast.status.v1 written before the call, oldest first."""
    records = await read_topic(kafka, Topic.BROADCAST_STATUS, key=job_id.encode())
    return sorted((BroadcastStatus.from_json(r.value) for r in records if r.value), key=lambda s: s.at)


async def funnel(pg: PostgresSettings, broadcast_id: str) -> dict[str, int] | None:
    """A broadcast's response funnel (None if nothing is loaded)."""
    conn = await connect(pg)
    try:
        return await responses.funnel(conn, broadcast_id)
    finally:
        await conn.close()
