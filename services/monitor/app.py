"""Wiring of the monitor: its resources, its subscriber on broadcast.lists.v1."""

from __future__ import annotations

from faststream import FastStream
from faststream.kafka.annotations import KafkaMessage

from services.monitor import DESCRIPTION, handlers
from services.monitor.settings import Settings
from shared.esp.resources import EspResources
from shared.model.topics import Topic
from shared.runtime.runtime import Runtime, ServiceSpec
from shared.runtime.status import StatusReporter


async def create_app(settings: Settings, runtime: Runtime) -> FastStream:
    """The monitor's app: consumes broadcast.lists.v1 in the espbridge-monitor consumer group."""
    esp = await EspResources.open(runtime.stack, settings.accounts, settings.sftp)
    pool = await runtime.open_pool(settings.pg)
    monitor = handlers.Monitor(settings, runtime, pool, esp.connectors, StatusReporter(runtime, pool))
    # A list is followed inside its handler until the send ends: allow that long between polls.
    max_poll_ms = int((settings.import_timeout_s + settings.send_timeout_s + 600) * 1000)

    @runtime.subscriber(Topic.BROADCAST_LISTS, max_poll_interval_ms=max_poll_ms)
    async def on_message(message: KafkaMessage) -> None:
        await handlers.handle_list(message.body, monitor)

    return FastStream(runtime.broker)


SERVICE = ServiceSpec("monitor", DESCRIPTION, Settings, create_app)
"""What ``python -m services.monitor`` runs."""
