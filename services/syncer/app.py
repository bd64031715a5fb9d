"""Wiring of the syncer: the CRM's pool, the ESP resources, its subscribers, each in a consumer group
of its own (so an ESP outage holding pushes never holds the ESPs' changes to the CRM), the capture
enabled at start where it is asked for, and the scheduled unsubscriber export."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from faststream import FastStream

from services.syncer import DESCRIPTION, handlers
from services.syncer.settings import Settings
from shared.esp.resources import EspResources
from shared.infra.outages import backoff_s
from shared.infra.settings import PostgresSettings
from shared.model.errors import is_transient
from shared.model.topics import Topic
from shared.operations.capture import ensure_capture, requests_from_capture
from shared.operations.exporting import schedule_unsubscriber_export
from shared.runtime.runtime import Runtime, ServiceSpec

log = logging.getLogger(__name__)

NAME = "syncer"


async def create_app(settings: Settings, runtime: Runtime) -> FastStream:
    """The syncer's app: subscriptions.changes.v1 (group espbridge-syncer-changes) into the CRM,
    crm.subscriptions.captured.v1 (espbridge-syncer-capture) into requests, and
    subscriptions.requests.v1 (espbridge-syncer-push) to the ESPs; the unsubscriber export on its
    schedule, if one is set."""
    esp = await EspResources.open(runtime.stack, settings.accounts, settings.sftp, settings.pg)
    crm_settings = settings.crm.resolve(settings.pg)
    crm = await runtime.open_pool(crm_settings)
    if settings.capture:
        await enable_capture(settings, esp.http, crm_settings)
    syncer = handlers.Syncer(settings, runtime, crm, esp.accounts, esp.connectors)
    batching = {
        "depth": settings.pipeline_batches,
        "max_records": settings.batch_max,
        "wait_ms": settings.batch_wait_ms,
    }
    runtime.batch_subscriber(
        Topic.SUBSCRIPTION_CHANGES,
        handlers.change_stages(syncer),
        group_id=settings.group_id(f"{NAME}-changes"),
        **batching,
    )
    prefix = settings.kafka.topic_prefix
    runtime.batch_subscriber(
        Topic.CRM_CAPTURED,
        handlers.capture_stages(syncer, lambda change: requests_from_capture(change, prefix, esp.accounts)),
        group_id=settings.group_id(f"{NAME}-capture"),
        **batching,
    )
    runtime.batch_subscriber(
        Topic.SUBSCRIPTION_REQUESTS,
        handlers.request_stages(syncer),
        group_id=settings.group_id(f"{NAME}-push"),
        **batching,
    )
    schedule_unsubscriber_export(runtime, crm, settings.export)
    return FastStream(runtime.broker)


async def enable_capture(settings: Settings, http: aiohttp.ClientSession, crm: PostgresSettings) -> None:
    """Post the capture's connector to the Kafka Connect worker and wait until it runs; a worker
    that cannot be reached is tried again until the start-up timeout, a refused configuration
    stops the start with the worker's reason."""
    connect = settings.connect
    secrets_file = connect.require_secrets_file()
    deadline = time.monotonic() + settings.startup_timeout_s
    attempt = 0
    while True:
        attempt += 1
        try:
            status = await ensure_capture(
                http,
                connect.url,
                settings.kafka,
                crm,
                secrets_file,
                database_host=connect.database_host,
                database_port=connect.database_port,
                timeout_s=connect.enable_timeout_s,
            )
        except Exception as exc:
            wait_s = backoff_s(attempt)
            if not is_transient(exc) or time.monotonic() + wait_s > deadline:
                raise
            log.warning(
                "the capture could not be enabled yet: retrying",
                extra={"connect_url": connect.url, "error": str(exc), "retry_in_s": wait_s},
            )
            await asyncio.sleep(wait_s)
            continue
        log.info(
            "capture enabled",
            extra={
                "connector": status.names.connector,
                "slot": status.names.slot,
                "topic": status.names.topic,
            },
        )
        return


SERVICE = ServiceSpec(NAME, DESCRIPTION, Settings, create_app)
"""What ``python -m services.syncer`` runs."""
