"""The generic connector's subscriptions against the sandbox's generic flavor: contacts pushed
through the contact calls, and ESP-side changes reported by the contacts webhook or, for an opt-out
a broadcast led to, in that broadcast's response files."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from shared.esp import AccountConfig, BadRow, ConnectorContext, ImportState
from shared.esp.accounts import SubscriptionPolicy
from shared.esp.base import ContactChange
from shared.esp.generic import GenericConnector
from shared.model.messages import EventType, ResponseEvent, SubscriptionChange, SubscriptionState
from tests.fixtures.sandbox import SandboxClient, Sandboxes, WebhookReceiver
from tests.fixtures.waits import wait_for
from tests.unit.test_messages import job

SUBSCRIBED, PENDING = SubscriptionState.SUBSCRIBED, SubscriptionState.PENDING
UNSUBSCRIBED, REMOVED = SubscriptionState.UNSUBSCRIBED, SubscriptionState.REMOVED


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    """espbridge's webhook endpoint as the sandbox calls it."""
    async with WebhookReceiver() as hooks:
        yield hooks


@pytest.fixture
def esp(sandbox: Sandboxes, receiver: WebhookReceiver) -> SandboxClient:
    return sandbox(generic_webhook_url=receiver.url)


def connector(esp: SandboxClient) -> GenericConnector:
    account = AccountConfig(
        esp="sandbox",
        account="demo",
        api_url=esp.api(),
        token=SecretStr(esp.token),
        subscriptions=SubscriptionPolicy(lists=("news", "offers")),
    )
    return GenericConnector(account, ConnectorContext(esp.http))


def change(email: str, state: SubscriptionState | None, list_id: str = "news", **more: Any) -> ContactChange:
    return ContactChange(email=email, list=list_id, state=state, **more)


async def reported(receiver: WebhookReceiver, esp: SandboxClient, count: int) -> list[SubscriptionChange]:
    """The first ``count`` changes the webhook received, parsed as the gatherer parses them."""

    def arrived() -> list[dict[str, Any]] | None:
        items = [i for call in receiver.calls for i in orjson.loads(call.body)]
        return items if len(items) >= count else None

    await wait_for(arrived, 15, 0.05, what=f"{count} webhook changes")
    parsed: list[SubscriptionChange] = []
    for call in receiver.calls:
        assert call.path == "/webhooks/demo"
        for item in connector(esp).parse_webhook(call.headers, call.body):
            assert isinstance(item, SubscriptionChange), item
            parsed.append(item)
    return parsed[:count]


async def test_contacts_are_subscribed_updated_unsubscribed_and_removed_at_the_esp(
    esp: SandboxClient,
) -> None:
    c = connector(esp)
    results = await c.apply_contacts(
        [
            change("ann@example.com", SUBSCRIBED, fields={"FirstName": "Ann"}),
            change("bob@example.com", SUBSCRIBED),
            change("bad@exa_mple.com", SUBSCRIBED),
            change("cy@example.com", UNSUBSCRIBED, "offers", reason="crm opt-out"),
        ]
    )
    assert [(r.email, r.accepted, r.state) for r in results] == [
        ("ann@example.com", True, SUBSCRIBED),
        ("bob@example.com", True, SUBSCRIBED),
        ("bad@exa_mple.com", False, None),
        ("cy@example.com", True, UNSUBSCRIBED),
    ]
    assert results[2].detail == "invalid_email: 'bad@exa_mple.com' is not a valid email address"

    results = await c.apply_contacts(
        [change("ann@example.com", None, fields={"City": "Oslo"}), change("bob@example.com", REMOVED)]
    )
    assert [(r.accepted, r.state) for r in results] == [(True, SUBSCRIBED), (True, REMOVED)]
    (unknown,) = await c.apply_contacts([change("dee@example.com", None, fields={"City": "Rome"})])
    assert (unknown.accepted, unknown.detail) == (False, "contact_not_found: dee@example.com is not on news")

    records = {(r["list"], r["email"]): r for r in await esp.contacts()}
    assert {k: r["state"] for k, r in records.items()} == {
        ("news", "ann@example.com"): "subscribed",
        ("news", "bob@example.com"): "removed",
        ("offers", "cy@example.com"): "unsubscribed",
    }
    assert records[("news", "ann@example.com")]["fields"] == {"FirstName": "Ann", "City": "Oslo"}
    assert records[("offers", "cy@example.com")]["reason"] == "crm opt-out"


async def test_a_double_opt_in_is_pending_until_the_contact_confirms_and_the_webhook_says_so(
    esp: SandboxClient, receiver: WebhookReceiver
) -> None:
    (result,) = await connector(esp).apply_contacts(
        [change("ann@example.com", SUBSCRIBED, double_opt_in=True)]
    )
    assert (result.accepted, result.state) == (True, PENDING)
    assert receiver.calls == []  # a change the API caller made is not reported back

    status, record = await esp.contact_action("confirm", "ann@example.com", "news")
    assert (status, record["state"]) == (200, "subscribed")
    (confirmed,) = await reported(receiver, esp, 1)
    assert (confirmed.email, confirmed.list, confirmed.state, confirmed.reason) == (
        "ann@example.com",
        "news",
        SUBSCRIBED,
        "confirm",
    )


async def test_esp_side_opt_outs_are_reported_by_webhook_or_in_the_broadcasts_responses(
    esp: SandboxClient, receiver: WebhookReceiver
) -> None:
    c = connector(esp)
    broadcast = job(job_id="job-7")
    rows = "Email,CommunicationKey\nann@example.com,k1\nbob@example.com,k2\n"
    file = esp.upload("drop/job-7.csv", rows.encode())
    imported = await c.start_import(f"sandbox/demo/{file}", broadcast)

    async def import_done() -> bool:
        return (await c.import_status(imported.import_id)).state is ImportState.DONE

    await wait_for(import_done, 30, 0.05, what="the import")
    assert {r["email"]: r["state"] for r in await esp.contacts(list_id="news")} == {
        "ann@example.com": "subscribed",
        "bob@example.com": "subscribed",
    }
    await c.send(imported.import_id, broadcast)
    await esp.complete_manifest("job-7")

    assert (await esp.contact_action("unsubscribe_link", "ann@example.com", "news", job="job-7"))[0] == 200
    assert (await esp.contact_action("complaint", "bob@example.com", "offers"))[0] == 200
    assert (await esp.contact_action("unsubscribe_link", "cy@example.com", "news"))[0] == 200

    (complaint, link) = await reported(receiver, esp, 2)
    assert [(x.email, x.list, x.state, x.reason) for x in (complaint, link)] == [
        ("bob@example.com", "offers", UNSUBSCRIBED, "complaint"),
        ("cy@example.com", "news", UNSUBSCRIBED, "unsubscribe"),
    ]
    responses = esp.account_dir() / "responses"
    (opt_out_file,) = responses.glob("*_c*_optouts.csv")
    items = list(c.parse_response_file(opt_out_file, f"sandbox/demo/responses/{opt_out_file.name}"))
    assert not [i for i in items if isinstance(i, BadRow)]
    (event,) = items
    assert isinstance(event, ResponseEvent)
    assert (event.broadcast_id, event.email, event.communication_key, event.type) == (
        "job-7",
        "ann@example.com",
        "k1",
        EventType.UNSUBSCRIBE,
    )
    # the broadcast's opt-out went to its responses, not to the webhook
    assert len([i for call in receiver.calls for i in orjson.loads(call.body)]) == 2
