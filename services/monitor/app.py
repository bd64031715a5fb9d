"""Wiring of the monitor: its resources, its subscribers on broadcast.lists.v1 and
broadcast.cancels.v1, and the due-work loop beside them."""

from __future__ import annotations

from faststream import FastStream
from faststream.kafka.annotations import KafkaMessage

from services.monitor import DESCRIPTION, handlers
from services.monitor.settings import Settings
from services.monitor.worker import DueWork
from shared.esp.resources import EspResources
from shared.model.topics import Topic
from shared.runtime.runtime import Runtime, ServiceSpec
from shared.runtime.status import StatusReporter


async def create_app(settings: Settings, runtime: Runtime) -> FastStream:
    """The monitor's app: consumes broadcast.lists.v1 and broadcast.cancels.v1 in the
    espbridge-monitor consumer group; the handlers only record work, which the loop runs."""
    esp = await EspResources.open(runtime.stack, settings.accounts, settings.sftp, settings.pg)
    pool = await runtime.open_pool(settings.pg)
    monitor = handlers.Monitor(settings, runtime, pool, esp.connectors, StatusReporter(runtime, pool))

    @runtime.subscriber(Topic.BROADCAST_LISTS)
    async def on_list(message: KafkaMessage) -> None:
        await handlers.handle_list(message.body, monitor)

    @runtime.subscriber(Topic.BROADCAST_CANCELS)
    async def on_cancel(message: KafkaMessage) -> None:
        await handlers.handle_cancel(message.body, monitor)

    runtime.run_in_background("due work", DueWork(monitor).run)
    return FastStream(runtime.broker)


SERVICE = ServiceSpec("monitor", DESCRIPTION, Settings, create_app)
"""What ``python -m services.monitor`` runs."""
