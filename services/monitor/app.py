"""Wiring of the monitor: its subscriber on BROADCAST_LISTS and what it publishes."""

from __future__ import annotations

from faststream import FastStream
from faststream.kafka.annotations import KafkaMessage

from services.monitor import handlers
from services.monitor.settings import Settings
from shared.service import Runtime
from shared.topics import Topic

DESCRIPTION = (
    "Consumes uploaded lists (broadcast.lists.v1) and reports their import stage on broadcast.status.v1."
)


async def create_app(settings: Settings, runtime: Runtime) -> FastStream:
    """The monitor's app: consumes BROADCAST_LISTS in the espbridge-monitor consumer group."""
    del settings  # the monitor has no settings of its own yet

    @runtime.subscriber(Topic.BROADCAST_LISTS)
    async def on_message(message: KafkaMessage) -> None:
        await handlers.handle_list(message.body, runtime)

    return FastStream(runtime.broker)
