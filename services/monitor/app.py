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

    cancels = settings.kafka.topic(Topic.BROADCAST_CANCELS)

    # One consumer for both topics: one member of the group, one join at start.
    @runtime.subscriber(Topic.BROADCAST_LISTS, Topic.BROADCAST_CANCELS)
    async def on_message(message: KafkaMessage) -> None:
        record = message.raw_message
        assert not isinstance(record, tuple)  # one record per message: no batch subscriber
        if record.topic == cancels:
            await handlers.handle_cancel(message.body, monitor)
        else:
            await handlers.handle_list(message.body, monitor)

    runtime.run_in_background("due work", DueWork(monitor).run)
    return FastStream(runtime.broker)


SERVICE = ServiceSpec("monitor", DESCRIPTION, Settings, create_app)
"""What ``python -m services.monitor`` runs."""
