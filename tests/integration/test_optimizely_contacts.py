"""Subscription sync between the Optimizely connector and the sandbox's optimizely flavor.

The connector pushes contacts to the flavor (a real process) through the contract proxy, which
holds every call and answer to Optimizely's OpenAPI document; what the flavor's lists then hold is
read with the sandbox's ``_sandbox/contacts`` control route. Changes made on the ESP side (a
confirmation, a link unsubscribe, a complaint) come back as the flavor's webhook calls to a
receiver in the test, and the connector parses them into subscription changes, as the gatherer
does with a webhook call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from shared.esp import ConnectorContext
from shared.esp.accounts import SubscriptionPolicy
from shared.esp.base import ContactChange, ContactResult
from shared.esp.optimizely import OptimizelyConnector
from shared.model.messages import EventType, ResponseEvent, SubscriptionChange, SubscriptionState
from tests.fixtures.contract import ContractProxy
from tests.fixtures.sandbox import OPTIMIZELY_USER, SandboxClient, Sandboxes, WebhookReceiver, basic
from tests.fixtures.waits import wait_for
from tests.unit.test_optimizely_connector import CLIENT, SECRET, account

SUBSCRIBED = SubscriptionState.SUBSCRIBED
UNSUBSCRIBED = SubscriptionState.UNSUBSCRIBED
PENDING = SubscriptionState.PENDING
REMOVED = SubscriptionState.REMOVED
DOUBLE_OPT_IN = 102
"""The flavor's default double opt-in process."""
CONTACT_OPERATIONS = {
    "PUT /{clientId}/recipients/{recipientListId}",
    "POST /{clientId}/recipients/{recipientListId}",
    "PUT /{clientId}/recipients/{recipientListId}/modify",
    "DELETE /{clientId}/recipients/{recipientListId}",
    "GET /{clientId}/recipients",
    "POST /{clientId}/unsubscribes",
    "DELETE /{clientId}/unsubscribes",
}
"""The operations the connector's contact calls are, each checked at least once."""
HOOK_AUTH = orjson.dumps({"type": "basicAuth", "userName": "espbridge", "password": SECRET}).decode()


@dataclass
class Optimizely:
    """The flavor, the connector calling it through the contract proxy, and the webhook receiver."""

    esp: SandboxClient
    proxy: ContractProxy
    connector: OptimizelyConnector
    hooks: WebhookReceiver

    async def push(self, *changes: ContactChange) -> list[ContactResult]:
        return await self.connector.apply_contacts(changes)

    async def records(self, email: str) -> dict[str, dict[str, Any]]:
        """The contact's records in the flavor's book, by list."""
        url = f"{self.esp.api()}/_sandbox/contacts"
        async with self.esp.http.get(url, params={"email": email}, headers=self.esp.headers) as resp:
            assert resp.status == 200, await resp.text()
            return {r["list"]: r for r in (await resp.json())["contacts"]}

    async def state(self, email: str, list_id: str = "4001") -> str | None:
        record = (await self.records(email)).get(list_id)
        return record["state"] if record is not None else None

    async def act(self, email: str, action: str, list_id: str = "4001", job: str | None = None) -> None:
        """A change made on the ESP side (the control route)."""
        body = {"email": email, "list": list_id, "action": action, **({"job": job} if job else {})}
        url = f"{self.esp.api()}/_sandbox/contacts"
        async with self.esp.http.post(url, json=body, headers=self.esp.headers) as resp:
            assert resp.status == 200, await resp.text()

    async def reported(self, count: int) -> list[SubscriptionChange | ResponseEvent]:
        """The first ``count`` webhook calls once they came, parsed by the connector."""
        await wait_for(lambda: len(self.hooks.calls) >= count, 15, 0.05, what=f"{count} webhook calls")
        items: list[SubscriptionChange | ResponseEvent] = []
        for call in self.hooks.calls[:count]:
            for item in self.connector.parse_webhook(call.headers, call.body):
                assert isinstance(item, SubscriptionChange | ResponseEvent), item
                items.append(item)
        return items

    async def client_call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """A call of the test's own through the proxy (so it is held to the document too)."""
        headers = basic(OPTIMIZELY_USER, self.esp.token)
        async with self.esp.http.request(
            method, f"{self.proxy.url}/{CLIENT}/{path}", headers=headers, **kwargs
        ) as resp:
            raw = await resp.read()
            return resp.status, orjson.loads(raw) if raw else None


@asynccontextmanager
async def optimizely(sandbox: Sandboxes, list_unsubscribes: bool = False) -> AsyncIterator[Optimizely]:
    """The flavor with webhooks of every type it reports, and the connector of its account ``demo``
    syncing the lists 4001 and 4002."""
    async with WebhookReceiver() as hooks:
        settings = {
            "opt_client_ids": f"demo={CLIENT}",
            "opt_webhook_url": hooks.url,
            "opt_webhook_auth": HOOK_AUTH,
            "opt_list_unsubscribes": str(list_unsubscribes).lower(),
        }
        with sandbox("optimizely", **settings) as esp:
            async with ContractProxy(f"{esp.url}/rest") as proxy:
                demo = account(
                    proxy.url,
                    esp.token,
                    timeout=30.0,
                    double_opt_in_process_id=DOUBLE_OPT_IN,
                    list_unsubscribes=list_unsubscribes,
                )
                demo = demo.model_copy(update={"subscriptions": SubscriptionPolicy(lists=("4001", "4002"))})
                connector = OptimizelyConnector(demo, ConnectorContext(esp.http))
                yield Optimizely(esp, proxy, connector, hooks)
            proxy.calls.assert_kept()


@contextmanager
def no_more_calls(opt: Optimizely) -> Iterator[None]:
    """The block makes no webhook call (changes made through the API are not reported)."""
    before = len(opt.hooks.calls)
    yield
    assert len(opt.hooks.calls) == before


def change(
    email: str, state: SubscriptionState | None, list_id: str = "4001", **kwargs: Any
) -> ContactChange:
    return ContactChange(email, list_id, state, **kwargs)


async def test_contacts_go_to_the_flavor_and_its_own_changes_come_back_as_subscription_changes(
    sandbox: Sandboxes,
) -> None:
    async with optimizely(sandbox) as opt:
        with no_more_calls(opt):
            results = await opt.push(
                change("anna@example.com", SUBSCRIBED, fields={"firstname": "Anna"}),
                change("bert@example.com", SUBSCRIBED, "4002"),
                change("cleo@example.com", SUBSCRIBED, double_opt_in=True),
            )
        assert [(r.accepted, r.state) for r in results] == [
            (True, SUBSCRIBED),
            (True, SUBSCRIBED),
            (True, PENDING),
        ]
        anna = (await opt.records("anna@example.com"))["4001"]
        assert (anna["state"], anna["fields"]) == ("subscribed", {"firstname": "Anna"})
        assert await opt.state("bert@example.com", "4002") == "subscribed"
        assert await opt.state("cleo@example.com") == "pending"

        # The double opt-in confirmed at the ESP: reported by the doubleoptin webhook.
        await opt.act("cleo@example.com", "confirm")
        (confirmed,) = await opt.reported(1)
        assert isinstance(confirmed, SubscriptionChange)
        assert (confirmed.email, confirmed.list, confirmed.state, confirmed.reason) == (
            "cleo@example.com",
            "4001",
            SUBSCRIBED,
            "doubleoptin",
        )
        assert await opt.state("cleo@example.com") == "subscribed"

        # Fields, an unsubscribe, a subscribe again, a removal: each as the flavor's lists show it.
        (updated,) = await opt.push(
            change("anna@example.com", None, fields={"firstname": "Anne", "city": "Ulm"})
        )
        assert (updated.accepted, updated.state) == (True, None)
        assert (await opt.records("anna@example.com"))["4001"]["fields"] == {
            "firstname": "Anne",
            "city": "Ulm",
        }
        (gone,) = await opt.push(change("anna@example.com", UNSUBSCRIBED))
        assert (gone.accepted, gone.state) == (True, UNSUBSCRIBED)
        assert await opt.state("anna@example.com") == "unsubscribed"
        (back,) = await opt.push(change("anna@example.com", SUBSCRIBED))
        assert (back.accepted, back.state) == (True, SUBSCRIBED)
        assert await opt.state("anna@example.com") == "subscribed"
        (removed,) = await opt.push(change("bert@example.com", REMOVED, "4002"))
        assert (removed.accepted, removed.state) == (True, REMOVED)
        assert await opt.state("bert@example.com", "4002") == "removed"

        # What Optimizely refuses: a blocklisted address, a list the client does not have.
        status, _ = await opt.client_call("POST", "blacklistentries", data={"entry": "*@blocked.example"})
        assert status == 201
        blocked, unknown = await opt.push(
            change("dora@blocked.example", SUBSCRIBED), change("emil@example.com", SUBSCRIBED, "9999")
        )
        assert (blocked.accepted, blocked.detail) == (
            False,
            "Optimizely did not add it to recipient list 4001: it is on the blocklist",
        )
        assert not unknown.accepted
        assert "Optimizely does not know recipient list 9999" in unknown.detail
        assert await opt.state("dora@blocked.example") is None

        # The contact unsubscribes by the link in a message, another complains: both reported.
        await opt.act("anna@example.com", "unsubscribe_link")
        await opt.act("cleo@example.com", "complaint")
        _, link, complaint = await opt.reported(3)
        assert isinstance(link, SubscriptionChange)
        assert isinstance(complaint, SubscriptionChange)
        assert [(c.email, c.list, c.state, c.reason) for c in (link, complaint)] == [
            ("anna@example.com", "4001", UNSUBSCRIBED, "unsubscribe"),
            ("cleo@example.com", "4001", UNSUBSCRIBED, "complaint"),
        ]
        # The client's unsubscribe list holds for every list: a subscribe to 4002 lifts it first.
        (elsewhere,) = await opt.push(change("anna@example.com", SUBSCRIBED, "4002"))
        assert elsewhere.accepted
        status, entries = await opt.client_call(
            "GET", "unsubscribes", params={"recipientIds": "anna@example.com"}
        )
        assert (status, entries["elements"]) == (200, [])
    assert len(opt.hooks.calls) == 3
    assert CONTACT_OPERATIONS - set(opt.proxy.calls.operations) == set(), opt.proxy.calls.report()


async def test_list_unsubscribes_hold_for_their_list_and_a_broadcasts_link_stays_its_response(
    sandbox: Sandboxes,
) -> None:
    async with optimizely(sandbox, list_unsubscribes=True) as opt:
        await opt.push(change("anna@example.com", SUBSCRIBED), change("anna@example.com", SUBSCRIBED, "4002"))
        (gone,) = await opt.push(change("anna@example.com", UNSUBSCRIBED, "4002"))
        assert gone.accepted
        records = await opt.records("anna@example.com")
        assert {k: r["state"] for k, r in records.items()} == {"4001": "subscribed", "4002": "unsubscribed"}

        # A broadcast through batch sending: its recipients are on the batch's pool list.
        form = {"campaign": "7000", "campaignAction": "copy", "tag": "job-7"}
        status, batch = await opt.client_call("POST", "sending/batches", data=_multipart(form))
        assert status == 201
        people = [{"id": "K1", "data": {"email": "anna@example.com", "BroadcastId": "job-7"}}]
        status, _ = await opt.client_call(
            "PUT", f"sending/batches/{batch['id']}", json={"chunk": "c000001", "recipients": people}
        )
        assert status == 200
        assert (await opt.client_call("POST", f"sending/batches/{batch['id']}"))[0] == 202
        pool = str(batch["recipientListId"])
        await wait_for(
            lambda: opt.state("anna@example.com", pool), 10, 0.05, what="the pool list's recipient"
        )

        await opt.act("anna@example.com", "unsubscribe_link", pool, job="job-7")
        (event,) = await opt.reported(1)
        assert isinstance(event, ResponseEvent)
        assert (event.type, event.broadcast_id, event.communication_key, event.email) == (
            EventType.UNSUBSCRIBE,
            "job-7",
            "K1",
            "anna@example.com",
        )
        assert await opt.state("anna@example.com") == "subscribed", "the unsubscribe held for its list only"


def _multipart(fields: dict[str, str]) -> aiohttp.FormData:
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        form.add_field(name, value)
    return form
