"""The deployteq and instiller connectors' subscriptions against their sandbox flavors.

A real ``python -m sandbox`` process of each flavor: the connector pushes contacts through the
flavor's endpoints, and what the flavor holds is read the way a user checks it (the ESP's own
lookup, the sandbox's ``_sandbox/contacts``). Changes made on the ESP's side (the control route's
link unsubscribe, complaint, confirmation) reach the test's webhook receiver the way the flavor's
ESP reports them, and the connector's ``parse_webhook`` turns each call into subscription changes;
once, they reach a real gatherer, which publishes them on ``subscriptions.changes.v1``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import SecretStr

from shared.esp import AccountConfig, ConnectorContext
from shared.esp.accounts import SubscriptionPolicy
from shared.esp.base import Connector, ContactChange, ContactResult
from shared.esp.deployteq import DeployteqConnector
from shared.esp.instiller import InstillerConnector
from shared.model.messages import SubscriptionChange, SubscriptionState
from shared.model.topics import Topic
from tests.fixtures.deployment import Deployment
from tests.fixtures.kafka import read_until
from tests.fixtures.processes import healthy, stop
from tests.fixtures.sandbox import SandboxClient, Sandboxes, WebhookCall, WebhookReceiver
from tests.fixtures.servers import free_port
from tests.fixtures.waits import wait_for

ANN = "ann@example.com"


@dataclass(frozen=True)
class Esp:
    """One ESP of this file: its flavor, the list its account syncs, how its account reaches the
    sandbox, and how a user reads a contact's fields back from it."""

    name: str
    list_id: str
    account: Callable[[SandboxClient], AccountConfig]
    fields_of: Callable[[SandboxClient, str], Any]


def deployteq_account(esp: SandboxClient) -> AccountConfig:
    base = f"{esp.url}/deployteq/{esp.account}"
    return AccountConfig(
        esp="deployteq",
        account=esp.account,
        connector="deployteq",
        api_url=f"{base}/analytics-events",
        client_id=esp.account,
        client_secret=SecretStr(esp.token),
        token=SecretStr(esp.token),
        password=SecretStr(esp.token),
        options={
            "token_url": f"{base}/oauth2/token",
            "rest_url": f"{base}/app/api/rest/public/v2",
            "double_opt_in_url": f"{base}/datahook/data-receiver/optin",
        },
        subscriptions=SubscriptionPolicy(lists=("optin",), double_opt_in=True),
    )


async def deployteq_fields(esp: SandboxClient, email: str) -> Any:
    """The customers with the address, as Deployteq's lookup shows them."""
    url = f"{esp.url}/deployteq/{esp.account}/app/api/rest/public/v2/customer"
    async with esp.http.get(url, params={"token": esp.token, "emailaddress": email}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def instiller_account(esp: SandboxClient) -> AccountConfig:
    return AccountConfig(
        esp="instiller",
        account=esp.account,
        connector="instiller",
        api_url=f"{esp.url}/rest",
        client_id=esp.account,
        client_secret=SecretStr(esp.token),
        token=SecretStr(esp.token),
        options={"double_opt_in_workflow": "double_opt_in"},
        subscriptions=SubscriptionPolicy(lists=("newsletter",), double_opt_in=True),
    )


async def instiller_fields(esp: SandboxClient, email: str) -> Any:
    """The user, as ``users/details`` shows it."""
    query = {"api_id": esp.account, "api_key": esp.token, "email_address": email}
    async with esp.http.get(f"{esp.url}/rest/users/details", params=query) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


ESPS = {
    "deployteq": Esp("deployteq", "optin", deployteq_account, deployteq_fields),
    "instiller": Esp("instiller", "newsletter", instiller_account, instiller_fields),
}


@dataclass
class Setup:
    esp: Esp
    sandbox: SandboxClient
    connector: Connector
    hooks: WebhookReceiver

    async def apply(self, **change: Any) -> ContactResult:
        values = {"email": ANN, "list": self.esp.list_id, **change}
        (result,) = await self.connector.apply_contacts([ContactChange(**values)])
        return result

    async def record(self, email: str = ANN) -> dict[str, Any] | None:
        """The contact's record on the synced list, as ``_sandbox/contacts`` shows it."""
        url = f"{self.sandbox.api()}/_sandbox/contacts"
        query = {"email": email, "list": self.esp.list_id}
        async with self.sandbox.http.get(url, params=query, headers=self.sandbox.headers) as resp:
            assert resp.status == 200, await resp.text()
            found: list[dict[str, Any]] = (await resp.json())["contacts"]
        return found[0] if found else None

    async def state(self, email: str = ANN) -> str | None:
        record = await self.record(email)
        return record["state"] if record else None

    async def act(self, action: str, email: str = ANN) -> None:
        """A change on the ESP's side (the control route)."""
        body = {"email": email, "list": self.esp.list_id, "action": action}
        url = f"{self.sandbox.api()}/_sandbox/contacts"
        async with self.sandbox.http.post(url, json=body, headers=self.sandbox.headers) as resp:
            assert resp.status == 200, await resp.text()

    async def reported(self, count: int) -> list[WebhookCall]:
        """The first ``count`` webhook calls, once they arrived."""
        calls: list[WebhookCall] = await wait_for(
            lambda: self.hooks.calls[:count] if len(self.hooks.calls) >= count else None,
            10.0,
            what=f"{count} webhook calls",
        )
        return calls

    def parsed(self, call: WebhookCall) -> list[SubscriptionChange]:
        items = self.connector.parse_webhook(call.headers, call.body)
        assert all(isinstance(i, SubscriptionChange) for i in items), items
        return [i for i in items if isinstance(i, SubscriptionChange)]


@pytest.fixture(params=sorted(ESPS))
async def setup(request: pytest.FixtureRequest, sandbox: Sandboxes) -> Any:
    esp = ESPS[request.param]
    async with WebhookReceiver() as hooks:
        running = sandbox(esp.name, **{f"{esp.name}_webhook_url": hooks.url})
        connector_class = DeployteqConnector if esp.name == "deployteq" else InstillerConnector
        connector = connector_class(esp.account(running), ConnectorContext(http=running.http))
        yield Setup(esp, running, connector, hooks)


async def test_subscribe_update_unsubscribe_and_remove_reach_the_esp(setup: Setup) -> None:
    subscribed = await setup.apply(state=SubscriptionState.SUBSCRIBED, fields={"firstname": "Ann"})
    assert (subscribed.accepted, subscribed.state) == (True, SubscriptionState.SUBSCRIBED)
    assert await setup.state() == "subscribed"
    updated = await setup.apply(state=None, fields={"firstname": "Annie", "city": "Zeist"})
    assert updated.accepted
    shown = str(await setup.esp.fields_of(setup.sandbox, ANN))
    assert "Annie" in shown
    assert "Zeist" in shown
    unsubscribed = await setup.apply(state=SubscriptionState.UNSUBSCRIBED)
    assert unsubscribed.state is SubscriptionState.UNSUBSCRIBED
    assert await setup.state() == "unsubscribed"
    resubscribed = await setup.apply(state=SubscriptionState.SUBSCRIBED)
    assert resubscribed.state is SubscriptionState.SUBSCRIBED
    removed = await setup.apply(state=SubscriptionState.REMOVED)
    assert removed.accepted
    assert await setup.state() == "unsubscribed"  # neither ESP removes from a list by default
    assert setup.hooks.calls == []  # what an API caller changed is never reported back


async def test_a_double_opt_in_is_pending_until_confirmed_and_the_confirmation_is_reported(
    setup: Setup,
) -> None:
    result = await setup.apply(state=SubscriptionState.SUBSCRIBED, double_opt_in=True)
    assert (result.accepted, result.state) == (True, SubscriptionState.PENDING)
    assert await setup.state() == "pending"
    await setup.act("confirm")
    assert await setup.state() == "subscribed"
    (call,) = await setup.reported(1)
    (change,) = setup.parsed(call)
    assert (change.email, change.list, change.state, change.reason) == (
        ANN,
        setup.esp.list_id,
        SubscriptionState.SUBSCRIBED,
        "confirm",
    )
    assert (change.esp, change.account) == (setup.esp.name, setup.sandbox.account)


async def test_link_unsubscribes_and_complaints_at_the_esp_are_reported_as_changes(setup: Setup) -> None:
    bob = "bob@example.com"
    for email in (ANN, bob):
        assert (await setup.apply(email=email, state=SubscriptionState.SUBSCRIBED)).accepted
    await setup.act("unsubscribe_link")
    await setup.act("complaint", email=bob)
    first, second = await setup.reported(2)
    (unsubscribe,) = setup.parsed(first)
    (complaint,) = setup.parsed(second)
    assert (unsubscribe.email, unsubscribe.state, unsubscribe.reason) == (
        ANN,
        SubscriptionState.UNSUBSCRIBED,
        "unsubscribe",
    )
    assert (complaint.email, complaint.state, complaint.reason) == (
        bob,
        SubscriptionState.UNSUBSCRIBED,
        "complaint",
    )
    assert unsubscribe.occurred_at <= complaint.occurred_at
    assert unsubscribe.change_id != complaint.change_id
    # the same call delivered twice is the same change
    assert [c.change_id for c in setup.parsed(first)] == [unsubscribe.change_id]
    assert await setup.state(bob) == "unsubscribed"


async def test_a_contact_the_esp_refuses_is_a_refused_result_with_its_reason(setup: Setup) -> None:
    bad = await setup.apply(email="ann@not_a_domain.com", state=SubscriptionState.SUBSCRIBED)
    assert not bad.accepted
    assert "not a valid e" in bad.detail
    assert setup.sandbox.token not in bad.detail
    unknown = await setup.apply(list="weekly", state=SubscriptionState.SUBSCRIBED)
    assert not unknown.accepted
    assert "weekly" in unknown.detail


async def test_esp_side_changes_reach_the_gatherer_and_its_subscription_topic(
    deployment: Deployment, sandbox: Sandboxes
) -> None:
    token, name, port = f"hook-{deployment.unique}", deployment.account, free_port()
    entries = [deployment.offline_account(esp, name, token) for esp in ESPS]
    env = deployment.env(deployment.accounts_file(entries), ESPBRIDGE_GATHERER_SCAN_INTERVAL_S="30")
    with ExitStack() as stack:
        gatherer = deployment.start(stack, "gatherer", {**env, "ESPBRIDGE_HTTP_PORT": str(port)})
        await wait_for(lambda: healthy(port), timeout_s=60, what="the gatherer up")
        for esp in ESPS.values():
            hook = f"http://127.0.0.1:{port}/webhooks/{esp.name}/{{account}}"
            running = sandbox(esp.name, token=token, accounts=name, **{f"{esp.name}_webhook_url": hook})
            body = {"email": ANN, "list": esp.list_id, "action": "unsubscribe_link"}
            url = f"{running.api()}/_sandbox/contacts"
            async with running.http.post(url, json=body, headers=running.headers) as resp:
                assert resp.status == 200, await resp.text()
        records = await read_until(deployment.kafka, Topic.SUBSCRIPTION_CHANGES, lambda rs: len(rs) >= 2)
        assert stop(gatherer) == 0
    changes = sorted(
        (SubscriptionChange.model_validate_json(r.value or b"") for r in records), key=lambda c: c.esp
    )
    assert [(c.esp, c.account, c.email, c.list, c.state, c.reason) for c in changes] == [
        (esp.name, name, ANN, esp.list_id, SubscriptionState.UNSUBSCRIBED, "unsubscribe")
        for esp in ESPS.values()
    ]
