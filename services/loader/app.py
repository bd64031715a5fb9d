"""Wiring of the loader: its subscriber on RESPONSE_EVENTS and what it publishes."""

from __future__ import annotations

from faststream import FastStream
from faststream.kafka.annotations import KafkaMessage

from services.loader import handlers
from services.loader.settings import Settings
from shared.service import Runtime
from shared.topics import Topic

DESCRIPTION = "Consumes response events (responses.events.v1) for the response database."


async def create_app(settings: Settings, runtime: Runtime) -> FastStream:
    """The loader's app: consumes RESPONSE_EVENTS in the espbridge-loader consumer group."""
    del settings  # the loader has no settings of its own yet

    @runtime.subscriber(Topic.RESPONSE_EVENTS)
    async def on_message(message: KafkaMessage) -> None:
        await handlers.handle_event(message.body, runtime)

    return FastStream(runtime.broker)
