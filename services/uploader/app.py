"""Wiring of the uploader: its resources, its subscriber on broadcast.jobs.v1."""

from __future__ import annotations

from faststream import FastStream
from faststream.kafka.annotations import KafkaMessage

from services.uploader import DESCRIPTION, handlers
from services.uploader.settings import Settings
from shared.esp.resources import EspResources
from shared.model.topics import Topic
from shared.runtime.runtime import Runtime, ServiceSpec
from shared.runtime.status import StatusReporter


async def create_app(settings: Settings, runtime: Runtime) -> FastStream:
    """The uploader's app: consumes broadcast.jobs.v1 in the espbridge-uploader consumer group."""
    esp = await EspResources.open(runtime.stack, settings.accounts, settings.sftp, settings.pg)
    pool = await runtime.open_pool(settings.pg)
    crm = settings.crm
    crm_pool = pool if crm.same_database(settings.pg) else await runtime.open_pool(crm.resolve(settings.pg))
    uploader = handlers.Uploader(settings, runtime, pool, esp, StatusReporter(runtime, pool), crm_pool)

    @runtime.subscriber(Topic.BROADCAST_JOBS)
    async def on_message(message: KafkaMessage) -> None:
        await handlers.handle_job(message.body, uploader)

    return FastStream(runtime.broker)


SERVICE = ServiceSpec("uploader", DESCRIPTION, Settings, create_app)
"""What ``python -m services.uploader`` runs."""
