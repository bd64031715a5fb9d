"""Wiring of the gatherer: its subscriber on RESPONSE_FILES and what it publishes."""

from __future__ import annotations

from faststream import FastStream
from faststream.kafka.annotations import KafkaMessage

from services.gatherer import handlers
from services.gatherer.settings import Settings
from shared.service import Runtime
from shared.topics import Topic

DESCRIPTION = "Consumes remote response files to gather (responses.files.v1)."


async def create_app(settings: Settings, runtime: Runtime) -> FastStream:
    """The gatherer's app: consumes RESPONSE_FILES in the espbridge-gatherer consumer group."""
    del settings  # the gatherer has no settings of its own yet

    @runtime.subscriber(Topic.RESPONSE_FILES)
    async def on_message(message: KafkaMessage) -> None:
        await handlers.handle_file(message.body, runtime)

    return FastStream(runtime.broker)
