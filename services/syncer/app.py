"""Wiring of the syncer: the CRM's pool, the ESP resources, and its subscribers, each in a consumer
group of its own (so an ESP outage holding pushes never holds the ESPs' changes to the CRM)."""

from __future__ import annotations

from faststream import FastStream

from services.syncer import DESCRIPTION, handlers
from services.syncer.settings import Settings
from shared.esp.resources import EspResources
from shared.model.topics import Topic
from shared.operations.exporting import schedule_unsubscriber_export
from shared.runtime.runtime import Runtime, ServiceSpec

NAME = "syncer"


async def create_app(settings: Settings, runtime: Runtime) -> FastStream:
    """The syncer's app: subscriptions.changes.v1 (group espbridge-syncer-changes) into the CRM,
    and subscriptions.requests.v1 (espbridge-syncer-push) to the ESPs; the unsubscriber export on
    its schedule, if one is set."""
    esp = await EspResources.open(runtime.stack, settings.accounts, settings.sftp, settings.pg)
    crm = await runtime.open_pool(settings.crm.resolve(settings.pg))
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
    runtime.batch_subscriber(
        Topic.SUBSCRIPTION_REQUESTS,
        handlers.request_stages(syncer),
        group_id=settings.group_id(f"{NAME}-push"),
        **batching,
    )
    schedule_unsubscriber_export(runtime, crm, settings.export)
    return FastStream(runtime.broker)


SERVICE = ServiceSpec(NAME, DESCRIPTION, Settings, create_app)
"""What ``python -m services.syncer`` runs."""
