"""The Optimizely connector and the sandbox's optimizely flavor held to Optimizely's own OpenAPI document.

The connector runs in the test against the sandbox flavor (a real process) through the contract
proxy (tests/fixtures/contract.py), which checks every request the connector sends and every
answer the flavor gives; the list is read back from the real SFTP server. One broadcast goes the
whole way — batch, chunks, send, its status, the responses pulled from the API — so every
operation the connector calls is checked at least once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from shared.esp import ConnectorContext, ImportState, SendState, SentBroadcast
from shared.esp.base import CancelOutcome
from shared.esp.optimizely import OptimizelyConnector
from shared.infra.sftp import SftpPool
from shared.model.messages import EventType, ResponseEvent
from tests.fixtures.contract import ContractProxy
from tests.fixtures.fake_esp import pulled
from tests.fixtures.sandbox import BUSY_RATES, SandboxClient, Sandboxes
from tests.fixtures.servers import Servers
from tests.fixtures.waits import wait_for
from tests.unit.test_messages import job
from tests.unit.test_optimizely_connector import CLIENT, account

RECIPIENTS = 90
CONNECTOR_OPERATIONS = {
    "GET /{clientId}/sending/batches",
    "POST /{clientId}/sending/batches",
    "GET /{clientId}/sending/batches/{sendingBatchId}",
    "PUT /{clientId}/sending/batches/{sendingBatchId}",
    "POST /{clientId}/sending/batches/{sendingBatchId}",
    "GET /{clientId}/smartcampaigns/{campaignId}",
    "GET /{clientId}/smartcampaigns/{campaignId}/report",
    "GET /{clientId}/responses",
    "GET /{clientId}/recipients/{recipientListId}",
    "GET /{clientId}/unsubscribes",
}
"""The operations the connector calls in a broadcast's life, each to be checked at least once."""
API_TYPES = {
    "bounce_hard": EventType.BOUNCE_HARD,
    "bounce_soft": EventType.BOUNCE_SOFT,
    "unsubscribe": EventType.UNSUBSCRIBE,
}
"""The manifest's counts of what the flavor's API carries, as the connector's event types."""


def list_file(job_id: str) -> bytes:
    """The uploader's list file: ``;``, UTF-8, ``email``, ``CommunicationKey`` and a mapped field."""
    rows = ["email;CommunicationKey;firstname"]
    rows += [f"user{i}@example.com;K{i};Anna {i}" for i in range(RECIPIENTS)]
    return ("\n".join(rows) + "\n").encode()


def through(proxy: ContractProxy, esp: SandboxClient, pool: SftpPool, **options: Any) -> OptimizelyConnector:
    """The connector of the sandbox's account ``demo``, calling it through the contract proxy."""
    demo = account(proxy.url, esp.token, timeout=30.0, **options)
    return OptimizelyConnector(demo, ConnectorContext(esp.http, pool))


@pytest.fixture
async def pool(servers: Servers) -> AsyncIterator[SftpPool]:
    """The SFTP pool the connector reads the list back through."""
    opened = SftpPool(servers.sftp)
    yield opened
    await opened.close()


async def test_a_broadcast_through_the_connector_keeps_to_the_openapi_document(
    sandbox: Sandboxes, pool: SftpPool, sftp_folder: tuple[str, Path]
) -> None:
    settings = {**BUSY_RATES, "opt_client_ids": f"demo={CLIENT}", "opt_source_weights": "file=1,api=3"}
    remote, local = sftp_folder
    broadcast_job = job(job_id="contract-1", esp="optimizely", message="7000")
    (local / "contract-1.csv").write_bytes(list_file(broadcast_job.job_id))
    with sandbox("optimizely", **settings) as esp:
        async with ContractProxy(f"{esp.url}/rest") as proxy:
            connector = through(proxy, esp, pool, page_size=10, responses_limit=3, chunk_size=25)
            requested = datetime.now(UTC) - timedelta(seconds=1)
            imported = await connector.start_import(f"{remote}/contract-1.csv", broadcast_job)
            assert (imported.state, imported.rows_valid) == (ImportState.DONE, RECIPIENTS)
            assert (await connector.import_status(imported.import_id)).state is ImportState.DONE
            sent = await connector.send(imported.import_id, broadcast_job)
            again = await connector.send(imported.import_id, broadcast_job)  # a 409, followed
            assert again.send_id == sent.send_id

            async def finished() -> bool:
                return (await connector.send_status(sent.send_id)).state is SendState.SENT

            await wait_for(finished, 30, 0.1, what="the send to finish")
            found = await connector.find_send(broadcast_job)
            assert found is not None
            assert found.recipients == RECIPIENTS
            manifest = await esp.complete_manifest(broadcast_job.job_id)

            broadcast = SentBroadcast(
                broadcast_job.job_id, "7000", imported.import_id, sent.send_id, requested
            )
            api_made = {
                API_TYPES[kind]: n for kind, n in manifest["by_source"]["api"].items() if kind in API_TYPES
            }
            events: dict[UUID, ResponseEvent] = {}
            cursors: list[str | None] = [None]

            async def all_pulled() -> bool:
                pulls = await pulled(connector, broadcast, cursors[-1])  # a round, as the gatherer makes it
                cursors.append(pulls.cursors[-1])
                events.update({e.event_id: e for e in pulls.items if isinstance(e, ResponseEvent)})
                by_type = {t: sum(e.type is t for e in events.values()) for t in api_made}
                return by_type == api_made

            await wait_for(all_pulled, 30, 0.2, what="the API's bounces and unsubscribes to be pulled")

    assert sum(api_made.values()) > 0, manifest["by_source"]
    assert CONNECTOR_OPERATIONS - set(proxy.calls.operations) == set(), proxy.calls.report()
    assert proxy.calls.silenced["error answers"] >= 1, "the second send's 409 was not seen"
    proxy.calls.assert_kept()


async def test_a_cancel_through_the_connector_keeps_to_the_openapi_document(
    sandbox: Sandboxes, pool: SftpPool, sftp_folder: tuple[str, Path]
) -> None:
    # The started campaign stays activated (its send waits IMPORT_DELAY_S): the cancel comes first.
    settings = {"opt_client_ids": f"demo={CLIENT}", "import_delay_s": "60"}
    remote, local = sftp_folder
    broadcast_job = job(job_id="contract-cancel", esp="optimizely", message="7000")
    (local / "contract-cancel.csv").write_bytes(list_file(broadcast_job.job_id))
    with sandbox("optimizely", **settings) as esp:
        async with ContractProxy(f"{esp.url}/rest") as proxy:
            connector = through(proxy, esp, pool)
            imported = await connector.start_import(f"{remote}/contract-cancel.csv", broadcast_job)
            sent = await connector.send(imported.import_id, broadcast_job)

            cancelled = await connector.cancel_send(sent.send_id, broadcast_job)
            again = await connector.cancel_send(sent.send_id, broadcast_job)  # no second stop
            status = await connector.send_status(sent.send_id)

            assert (cancelled.outcome, again.outcome) == (CancelOutcome.CANCELLED, CancelOutcome.CANCELLED)
            assert cancelled.detail.endswith("cancelled while activated: nothing was sent")
            assert (status.state, status.detail.endswith("canceled")) == (SendState.FAILED, True)
            stats = await esp.stats(CLIENT)
            assert (stats["sends_created"], stats["sends_cancelled"]) == (
                {"contract-cancel": 1},
                {"contract-cancel": 1},
            )
            assert esp.manifest("contract-cancel") is None
    assert proxy.calls.operations["POST /{clientId}/smartcampaigns/{campaignId}/stop"] == 1
    proxy.calls.assert_kept()
