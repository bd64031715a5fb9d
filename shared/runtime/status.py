"""How a service reports where a broadcast is: its :class:`BroadcastStatus` on broadcast.status.v1,
and, for the stages a service drives a job through (upload, import, send), the job's row in
control.jobs with its history."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from shared.infra.db import jobs
from shared.model.messages import BroadcastStatus
from shared.runtime.runtime import Runtime


@dataclass(frozen=True, slots=True)
class StatusReporter:
    """Publishes a service's statuses, and records them in control.jobs when it is given the pool."""

    runtime: Runtime
    pool: asyncpg.Pool | None = None
    """The database of control.jobs, for a service that records its statuses; None: published only."""

    async def report(self, status: BroadcastStatus) -> None:
        """Publish a status (acknowledged by Kafka), then record it."""
        await self.runtime.publish(status)
        if self.pool is not None:
            async with self.pool.acquire() as conn:
                await jobs.record_status(conn, status)

    async def report_all(self, statuses: Sequence[BroadcastStatus]) -> None:
        """Publish statuses in one go, waiting for every acknowledgement, then record them."""
        await self.runtime.publish_many(statuses)
        if statuses and self.pool is not None:
            async with self.pool.acquire() as conn:
                for status in statuses:
                    await jobs.record_status(conn, status)
