"""Wiring of the loader: its pool, its batch subscriber on responses.events.v1."""

from __future__ import annotations

from faststream import FastStream

from services.loader import DESCRIPTION, handlers
from services.loader.settings import Settings
from shared.model.topics import Topic
from shared.runtime.runtime import Runtime, ServiceSpec
from shared.runtime.status import StatusReporter


async def create_app(settings: Settings, runtime: Runtime) -> FastStream:
    """The loader's app: consumes responses.events.v1 in the espbridge-loader consumer group."""
    pool = await runtime.open_pool(settings.pg)
    loader = handlers.Loader(settings, runtime, pool, StatusReporter(runtime))
    runtime.batch_subscriber(
        Topic.RESPONSE_EVENTS,
        handlers.stages(loader),
        depth=settings.pipeline_batches,
        max_records=settings.batch_max,
        wait_ms=settings.batch_wait_ms,
        max_partition_fetch_bytes=settings.fetch_partition_bytes,
    )
    return FastStream(runtime.broker)


SERVICE = ServiceSpec("loader", DESCRIPTION, Settings, create_app)
"""What ``python -m services.loader`` runs."""
