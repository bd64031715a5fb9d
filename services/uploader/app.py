"""Wiring of the uploader: its subscriber on BROADCAST_JOBS and what it publishes."""

from __future__ import annotations

from faststream import FastStream
from faststream.kafka.annotations import KafkaMessage

from services.uploader import handlers
from services.uploader.settings import Settings
from shared.service import Runtime
from shared.topics import Topic

DESCRIPTION = (
    "Consumes broadcast jobs (broadcast.jobs.v1), validates them and reports their "
    "upload stage on broadcast.status.v1."
)


def create_app(settings: Settings, runtime: Runtime) -> FastStream:
    """The uploader's app: consumes BROADCAST_JOBS in the espbridge-uploader consumer group."""
    del settings  # the uploader has no settings of its own yet

    @runtime.subscriber(Topic.BROADCAST_JOBS)
    async def on_message(message: KafkaMessage) -> None:
        await handlers.handle_job(message.body, runtime)

    return FastStream(runtime.broker)
