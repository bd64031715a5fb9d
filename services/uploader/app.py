"""Wiring of the uploader: its resources, its subscriber on broadcast.jobs.v1."""

from __future__ import annotations

import aiohttp
from faststream import FastStream
from faststream.kafka.annotations import KafkaMessage

from services.uploader import handlers
from services.uploader.settings import Settings
from shared.esp import Accounts, ConnectorContext, Connectors
from shared.infra.sftp import SftpPool
from shared.model.topics import Topic
from shared.runtime.runtime import Runtime, ServiceSpec

DESCRIPTION = (
    "Consumes broadcast jobs (broadcast.jobs.v1), streams each job's recipients into the ESP's list "
    "format, uploads the file to the ESP's SFTP drop (temporary name, then rename) and publishes "
    "ListUploaded (broadcast.lists.v1) and the upload stage on broadcast.status.v1."
)


async def create_app(settings: Settings, runtime: Runtime) -> FastStream:
    """The uploader's app: consumes broadcast.jobs.v1 in the espbridge-uploader consumer group."""
    accounts = Accounts.load(settings.accounts)
    pool = await runtime.open_pool(settings.pg)
    sftp = SftpPool(settings.sftp)
    runtime.stack.push_async_callback(sftp.close)
    http = await runtime.stack.enter_async_context(aiohttp.ClientSession())
    connectors = Connectors(accounts, ConnectorContext(http, sftp))
    uploader = handlers.Uploader(settings, runtime, pool, sftp, connectors)

    @runtime.subscriber(Topic.BROADCAST_JOBS)
    async def on_message(message: KafkaMessage) -> None:
        await handlers.handle_job(message.body, uploader)

    return FastStream(runtime.broker)


SERVICE = ServiceSpec("uploader", DESCRIPTION, Settings, create_app)
"""What ``python -m services.uploader`` runs."""
