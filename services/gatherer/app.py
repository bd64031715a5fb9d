"""Wiring of the gatherer: its resources, the scan loop, its subscriber on responses.files.v1."""

from __future__ import annotations

import asyncio
import contextlib
import shutil

from aiohttp import web
from faststream import FastStream
from faststream.kafka.annotations import KafkaMessage

from services.gatherer import DESCRIPTION, handlers
from services.gatherer.settings import Settings
from shared.esp.resources import EspResources
from shared.infra.kafka import HEADERS_JSON_V1, BatchPublisher
from shared.model.topics import Topic
from shared.runtime.runtime import Runtime, ServiceSpec
from shared.runtime.status import StatusReporter


async def create_app(settings: Settings, runtime: Runtime) -> FastStream:
    """The gatherer's app: consumes responses.files.v1 in the espbridge-gatherer consumer group."""
    esp = await EspResources.open(runtime.stack, settings.accounts, settings.sftp, settings.pg)
    pool = await runtime.open_pool(settings.pg)
    if settings.work_dir is not None:
        settings.work_dir.mkdir(parents=True, exist_ok=True)
        work_dir = settings.work_dir
    else:
        work_dir = handlers.default_work_dir()
        runtime.stack.callback(shutil.rmtree, work_dir, True)
    events = await BatchPublisher.open(
        settings.kafka, Topic.RESPONSE_EVENTS, client_id=runtime.name, headers=HEADERS_JSON_V1
    )
    runtime.stack.push_async_callback(events.close)
    gatherer = handlers.Gatherer(settings, runtime, pool, esp, work_dir, events, StatusReporter(runtime))

    async def on_webhook(request: web.Request) -> web.Response:
        return await handlers.handle_webhook(request, gatherer)

    runtime.http.add_route("POST", "/webhooks/{esp}/{account}", on_webhook)

    @runtime.subscriber(Topic.RESPONSE_FILES)
    async def on_message(message: KafkaMessage) -> None:
        await handlers.handle_file(message.body, gatherer)

    app = FastStream(runtime.broker)
    if settings.scan_interval_s > 0:
        tasks: list[asyncio.Task[None]] = []

        async def start_scanning() -> None:
            tasks.append(asyncio.create_task(gatherer.scan_forever(), name="scan"))

        async def stop_scanning() -> None:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        app.after_startup(start_scanning)
        app.on_shutdown(stop_scanning)
    return app


SERVICE = ServiceSpec("gatherer", DESCRIPTION, Settings, create_app)
"""What ``python -m services.gatherer`` runs."""
