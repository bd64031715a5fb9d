"""The deployteq connector's subscriptions against a small fake of what docs/connectors/deployteq.md
documents: the customer calls of the public REST API (``?token=``), the webhook receiver that starts
the double opt-in campaign, and the webhook calls of its campaigns' HTTP request objects.

The sandbox's deployteq flavor is tested elsewhere; nothing here is shared with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiohttp import web
from pydantic import SecretStr

from shared.esp import AccountConfig, BadRow, ConnectorContext, WebhookAuthError
from shared.esp.accounts import SubscriptionPolicy
from shared.esp.base import ContactChange, ContactResult
from shared.esp.deployteq import DeployteqConnector
from shared.esp.rest import EspUnavailableError
from shared.model.errors import ConfigurationError
from shared.model.messages import SubscriptionChange, SubscriptionState
from tests.fixtures.fake_esp import OFFLINE, FakeEsp, served

TOKEN = "api-t0ken"
WEBHOOK_SECRET = "hook-s3cret"
REST = "/app/api/rest/public/v2"
RECEIVER = "/app/api/rest/public/v2/project/datahook/data-receiver/optin"
ANN = "ann@example.com"


@dataclass
class FakeDeployteq(FakeEsp):
    """The customers of one brand, as the customer REST API and the webhook receiver show them."""

    customers: dict[int, dict[str, Any]] = field(default_factory=dict)
    received: list[dict[str, Any]] = field(default_factory=list)
    failing: list[int] = field(default_factory=list)
    """Statuses to answer the next calls with (429 with Retry-After, 503)."""

    def application(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", REST + "/customer", self.customers_route)
        app.router.add_route("*", REST + "/customer/{id}", self.customer_route)
        app.router.add_post(RECEIVER, self.receiver)
        return app

    def add(self, email: str, **values: str) -> int:
        number = 41 + len(self.customers) + 1
        self.customers[number] = {"id": number, "emailaddress": email, "optin": "Y", **values}
        return number

    def _refusal(self, request: web.Request) -> web.Response | None:
        if request.query.get("token") != TOKEN:
            return web.json_response({"message": "invalid token"}, status=401)
        if self.failing:
            status = self.failing.pop(0)
            return web.json_response({"message": "busy"}, status=status, headers={"Retry-After": "0"})
        return None

    async def customers_route(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        if request.method == "GET":
            email = request.query["emailaddress"]
            return web.json_response([c for c in self.customers.values() if c["emailaddress"] == email])
        body = await request.json()
        if body["emailaddress"].endswith(".invalid"):
            return web.json_response({"message": "emailaddress is not a valid e-mail address"}, status=400)
        number = self.add(body.pop("emailaddress"), **body)
        return web.json_response(self.customers[number], status=201)

    async def customer_route(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        number = int(request.match_info["id"])
        if number not in self.customers:
            return web.json_response({"message": "customer not found"}, status=404)
        if request.method == "DELETE":
            del self.customers[number]
            return web.Response(status=204)
        self.customers[number].update(await request.json())
        return web.json_response(self.customers[number])

    async def receiver(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"message": "unauthorized"}, status=401)
        self.received.append(await request.json())
        return web.json_response({"status": "ok"})


esp_fixture = served(FakeDeployteq)


def account(url: str = "http://127.0.0.1:1", *, double_opt_in: bool = False, **options: Any) -> AccountConfig:
    return AccountConfig(
        esp="deployteq",
        account="acme",
        connector="deployteq",
        api_url=f"{url}/analytics-events",
        client_id="acme",
        client_secret=SecretStr("s3cret"),
        token=SecretStr(TOKEN),
        password=SecretStr(WEBHOOK_SECRET),
        options={
            "rest_url": f"{url}{REST}",
            "double_opt_in_url": f"{url}{RECEIVER}",
            "list_fields": {"optin": "optin", "sports": "sports_news"},
            **options,
        },
        subscriptions=SubscriptionPolicy(lists=("optin", "sports"), double_opt_in=double_opt_in),
    )


def connector(esp: FakeDeployteq, **options: Any) -> DeployteqConnector:
    return DeployteqConnector(account(esp.url, **options), ConnectorContext(http=esp.http))


async def apply(c: DeployteqConnector, **change: Any) -> ContactResult:
    (result,) = await c.apply_contacts([ContactChange(**{"email": ANN, "list": "optin", **change})])
    return result


def calls(esp: FakeDeployteq) -> list[tuple[str, str]]:
    return [(s.method, s.path.removeprefix(REST)) for s in esp.seen]


# --- pushing contacts ---------------------------------------------------------------------------------


async def test_a_subscribe_creates_the_customer_opted_in_with_its_fields(esp: FakeDeployteq) -> None:
    c = connector(esp)
    result = await apply(c, state=SubscriptionState.SUBSCRIBED, fields={"firstname": "Ann"})
    assert result == ContactResult(ANN, "optin", accepted=True, state=SubscriptionState.SUBSCRIBED)
    assert calls(esp) == [("GET", "/customer"), ("POST", "/customer")]
    assert esp.seen[0].query == {"token": TOKEN, "emailaddress": ANN}
    assert esp.seen[1].query == {"token": TOKEN}
    assert esp.customers[42] == {"id": 42, "emailaddress": ANN, "optin": "Y", "firstname": "Ann"}
    assert c.contacts_per_call == 1  # Deployteq documents no batch of customers


async def test_every_customer_with_the_address_is_updated_on_the_lists_own_field(esp: FakeDeployteq) -> None:
    first, second = esp.add(ANN, sports_news="N"), esp.add(ANN, sports_news="N")
    result = await apply(connector(esp), list="sports", state=SubscriptionState.SUBSCRIBED)
    assert result.state is SubscriptionState.SUBSCRIBED
    assert calls(esp) == [("GET", "/customer"), ("PUT", f"/customer/{first}"), ("PUT", f"/customer/{second}")]
    assert [esp.customers[n]["sports_news"] for n in (first, second)] == ["Y", "Y"]


@pytest.mark.parametrize(
    ("state", "removal", "reported", "optin", "remains"),
    [
        (SubscriptionState.UNSUBSCRIBED, "opt_out", SubscriptionState.UNSUBSCRIBED, "N", True),
        (SubscriptionState.REMOVED, "opt_out", None, "N", True),
        (SubscriptionState.REMOVED, "delete_customer", SubscriptionState.REMOVED, None, False),
    ],
)
async def test_an_opt_out_sets_the_field_to_n_and_a_removal_may_delete_the_customer(
    esp: FakeDeployteq,
    state: SubscriptionState,
    removal: str,
    reported: SubscriptionState | None,
    optin: str | None,
    remains: bool,
) -> None:
    number = esp.add(ANN)
    result = await apply(connector(esp, removal=removal), state=state)
    assert (result.accepted, result.state) == (True, reported)
    assert (number in esp.customers) is remains
    if remains:
        assert esp.customers[number]["optin"] == optin
    else:
        assert calls(esp) == [("GET", "/customer"), ("DELETE", f"/customer/{number}")]


async def test_an_opt_out_of_an_unknown_address_creates_an_opted_out_customer(esp: FakeDeployteq) -> None:
    result = await apply(connector(esp), state=SubscriptionState.UNSUBSCRIBED)
    assert result.state is SubscriptionState.UNSUBSCRIBED
    assert esp.customers[42]["optin"] == "N"  # so a later import cannot mail the address


async def test_a_double_opt_in_leaves_the_field_n_and_starts_the_opt_in_campaign(esp: FakeDeployteq) -> None:
    c = connector(esp, double_opt_in=True)
    result = await apply(c, state=SubscriptionState.SUBSCRIBED, double_opt_in=True)
    assert result == ContactResult(ANN, "optin", accepted=True, state=SubscriptionState.PENDING)
    assert esp.customers[42]["optin"] == "N"
    assert esp.received == [{"emailaddress": ANN, "list": "optin", "field": "optin", "customer_id": 42}]
    # a confirmed subscriber gets no second confirmation mail
    esp.customers[42]["optin"] = "Y"
    again = await apply(c, state=SubscriptionState.SUBSCRIBED, double_opt_in=True)
    assert again.state is SubscriptionState.SUBSCRIBED
    assert len(esp.received) == 1


async def test_fields_alone_update_existing_customers_and_create_none(esp: FakeDeployteq) -> None:
    c = connector(esp)
    nobody = await apply(c, state=None, fields={"city": "Zeist"})
    assert (nobody.accepted, nobody.state) == (True, None)
    assert "nothing to update" in nobody.detail
    assert esp.customers == {}
    number = esp.add(ANN)
    await apply(c, state=None, fields={"city": "Zeist"})
    assert esp.customers[number] == {"id": number, "emailaddress": ANN, "optin": "Y", "city": "Zeist"}


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"email": "ann@example.invalid"}, "emailaddress is not a valid e-mail address"),
        ({"list": "weekly"}, "has no list 'weekly'"),
        ({"fields": {"optin": "Y"}}, "set by espbridge itself"),
        ({"fields": {"first name": "Ann"}}, "are not field names"),
    ],
)
async def test_a_contact_deployteq_refuses_is_a_result_with_the_reason(
    esp: FakeDeployteq, change: dict[str, Any], detail: str
) -> None:
    (result,) = await connector(esp).apply_contacts(
        [ContactChange(**{"email": ANN, "list": "optin", "state": SubscriptionState.SUBSCRIBED, **change})]
    )
    assert not result.accepted
    assert detail in result.detail
    assert TOKEN not in result.detail


async def test_a_blacklisted_customer_is_not_subscribed(esp: FakeDeployteq) -> None:
    number = esp.add(ANN, optin="N", status="BLACKLIST")
    result = await apply(connector(esp), state=SubscriptionState.SUBSCRIBED)
    assert not result.accepted
    assert "blacklisted" in result.detail
    assert esp.customers[number]["optin"] == "N"
    assert calls(esp) == [("GET", "/customer")]


async def test_a_429_is_retried_after_retry_after_and_an_outage_raises(esp: FakeDeployteq) -> None:
    c = connector(esp)
    esp.failing = [429]
    assert (await apply(c, state=SubscriptionState.SUBSCRIBED)).accepted
    assert calls(esp) == [("GET", "/customer"), ("GET", "/customer"), ("POST", "/customer")]
    esp.failing = [503]
    with pytest.raises(EspUnavailableError) as caught:
        await apply(c, state=SubscriptionState.UNSUBSCRIBED)
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    ("changed", "needs"),
    [
        ({"options": {"rest_url": None}}, "options.rest_url"),
        ({"token": None}, "token[_file]"),
        ({"options": {"list_fields": {"optin": "optin"}}}, "options.list_fields for the lists ['sports']"),
        (
            {"options": {"double_opt_in_url": None}, "double_opt_in": True},
            "options.double_opt_in_url",
        ),
    ],
)
def test_an_account_that_syncs_is_checked_at_the_start(changed: dict[str, Any], needs: str) -> None:
    good = account(double_opt_in=bool(changed.get("double_opt_in")))
    update: dict[str, Any] = {k: v for k, v in changed.items() if k in ("token",)}
    update["options"] = {**good.options, **changed.get("options", {})}
    with pytest.raises(ConfigurationError, match="syncs subscriptions and needs") as caught:
        DeployteqConnector(good.model_copy(update=update), OFFLINE)
    assert needs in str(caught.value)


def test_an_account_that_syncs_nothing_needs_no_rest_api() -> None:
    plain = account().model_copy(update={"subscriptions": SubscriptionPolicy(), "token": None, "options": {}})
    DeployteqConnector(plain, OFFLINE)


# --- ESP-side changes: the campaigns' HTTP request objects -----------------------------------------------


def webhook(body: Any, secret: str = WEBHOOK_SECRET) -> list[SubscriptionChange | BadRow]:
    c = DeployteqConnector(account(), OFFLINE)
    items = c.parse_webhook({"Authorization": f"Bearer {secret}"}, orjson.dumps(body))
    return [i for i in items if isinstance(i, (SubscriptionChange, BadRow))]


def test_webhook_items_become_subscription_changes_with_stable_ids() -> None:
    body = [
        {
            "event": "unsubscribe",
            "emailaddress": "Ann@Example.com",
            "list": "optin",
            "timestamp": "2026-11-22 10:00:03",
        },
        {
            "event": "confirm",
            "emailaddress": "bob@example.com",
            "timestamp": "2026-11-22T09:00:04Z",
            "id": 77,
        },
    ]
    first, second = webhook(body)
    assert isinstance(first, SubscriptionChange)
    assert isinstance(second, SubscriptionChange)
    assert (first.email, first.list, first.state, first.reason) == (
        ANN,
        "optin",
        SubscriptionState.UNSUBSCRIBED,
        "unsubscribe",
    )
    assert first.occurred_at == datetime(2026, 11, 22, 9, 0, 3, tzinfo=UTC)  # Amsterdam time
    assert (second.list, second.state, second.reason) == ("", SubscriptionState.SUBSCRIBED, "confirm")
    assert (first.esp, first.account) == ("deployteq", "acme")
    # the same call delivered again is the same changes
    assert [c.change_id for c in webhook(body)] == [first.change_id, second.change_id]  # type: ignore[union-attr]
    assert first.change_id != second.change_id


def test_a_bad_webhook_item_is_a_bad_row_and_the_others_are_kept() -> None:
    good = {"event": "complaint", "emailaddress": ANN, "timestamp": "2026-11-22 10:00:03"}
    items = webhook(
        [
            good,
            {"event": "clicked", "emailaddress": ANN, "timestamp": "2026-11-22 10:00:03"},
            {"event": "unsubscribe", "emailaddress": "not an address", "timestamp": "2026-11-22 10:00:03"},
            {
                "event": "unsubscribe",
                "emailaddress": ANN,
                "list": "weekly",
                "timestamp": "2026-11-22 10:00:03",
            },
            {"event": "unsubscribe", "emailaddress": ANN},
            "unsubscribe",
        ]
    )
    assert isinstance(items[0], SubscriptionChange)
    bad = [i for i in items if isinstance(i, BadRow)]
    assert [b.line for b in bad] == [2, 3, 4, 5, 6]
    assert "unknown event 'clicked'" in bad[0].error
    assert "unknown list 'weekly'" in bad[2].error
    assert "no timestamp" in bad[3].error
    assert orjson.loads(bad[0].raw)["event"] == "clicked"


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": WEBHOOK_SECRET}]
)
def test_a_webhook_call_without_the_secret_is_refused(headers: dict[str, str]) -> None:
    c = DeployteqConnector(account(), OFFLINE)
    with pytest.raises(WebhookAuthError):
        c.parse_webhook(headers, b"[]")


def test_an_account_without_a_webhook_secret_takes_no_webhook_calls() -> None:
    c = DeployteqConnector(account().model_copy(update={"password": None}), OFFLINE)
    with pytest.raises(WebhookAuthError, match="no webhook secret"):
        c.parse_webhook({"Authorization": f"Bearer {WEBHOOK_SECRET}"}, b"[]")
