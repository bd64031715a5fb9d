"""The instiller connector's subscriptions against a small fake of what docs/connectors/instiller.md
documents: ``users/add_or_update``, ``users/list_subscribe`` (``subscribed`` Y or N) and
``automation/trigger_workflow`` with ``api_id``/``api_key`` parameters, and the webhook calls of
the account's workflows.

The sandbox's instiller flavor is tested elsewhere; nothing here is shared with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiohttp import web
from pydantic import SecretStr

from shared.esp import AccountConfig, BadRow, ConnectorContext, NotSupportedError, WebhookAuthError
from shared.esp.accounts import SubscriptionPolicy
from shared.esp.base import ContactChange, ContactResult
from shared.esp.instiller import InstillerConnector
from shared.esp.rest import EspUnavailableError
from shared.model.errors import ConfigurationError
from shared.model.messages import SubscriptionChange, SubscriptionState
from tests.fixtures.fake_esp import OFFLINE, FakeEsp, served
from tests.unit.test_instiller_connector import API_ID, API_KEY, error
from tests.unit.test_instiller_connector import account as instiller_account

WEBHOOK_SECRET = "hook-s3cret"
ANN = "ann@example.com"


@dataclass
class FakeInstillerUsers(FakeEsp):
    """Users, their fields and their lists, as the users and automation endpoints show them."""

    base: str = "/rest"
    users: dict[str, dict[str, str]] = field(default_factory=dict)
    lists: dict[str, dict[str, str]] = field(default_factory=lambda: {"newsletter": {}})
    """list API identifier → email → Y or N."""
    triggered: list[dict[str, str]] = field(default_factory=list)
    failing: list[int] = field(default_factory=list)

    def application(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/rest/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        if request.method == "POST" and request.content_type != "multipart/form-data":
            return error(
                415, "unsupported_media_type", "POST parameters are read from multipart/form-data only"
            )
        p = (
            dict(request.query)
            if request.method == "GET"
            else {k: str(v) for k, v in (await request.post()).items()}
        )
        if (p.pop("api_id", None), p.pop("api_key", None)) != (API_ID, API_KEY):
            return error(401, "invalid_credentials", "API ID or key not recognised")
        if self.failing:
            return error(self.failing.pop(0), "internal_error", "try later", {"Retry-After": "0"})
        email = p.pop("email_address", "")
        if "@" not in email or email.endswith(".invalid"):
            return error(400, "invalid_parameter", "email_address is not a valid email address")
        tail = (request.method, request.match_info["tail"])
        if tail == ("POST", "users/add_or_update"):
            self.users.setdefault(email, {}).update(p)
            return web.json_response({"email_address": email, **self.users[email]})
        if tail == ("GET", "users/list_subscribe"):
            members = self.lists.get(p["list_api_identifier"])
            if members is None:
                return error(404, "list_not_found", f"no list {p['list_api_identifier']}")
            if email not in self.users:
                return error(404, "user_not_found", f"no user {email}")
            members[email] = p["subscribed"]
            return web.json_response({"email_address": email, **p})
        if tail == ("POST", "automation/trigger_workflow"):
            self.triggered.append({"email_address": email, **p})
            return web.json_response({"email_address": email, "triggered": True})
        return error(404, "not_found", "no such endpoint")


esp_fixture = served(FakeInstillerUsers)


def account(url: str = "http://127.0.0.1:1", *, double_opt_in: bool = False, **options: Any) -> AccountConfig:
    """The connector tests' account, syncing ``newsletter``, with a webhook secret."""
    base = instiller_account(url, **{"double_opt_in_workflow": "confirm_newsletter", **options})
    policy = SubscriptionPolicy(lists=("newsletter",), double_opt_in=double_opt_in)
    return base.model_copy(update={"token": SecretStr(WEBHOOK_SECRET), "subscriptions": policy})


def connector(esp: FakeInstillerUsers, **options: Any) -> InstillerConnector:
    return InstillerConnector(account(esp.url, **options), ConnectorContext(http=esp.http))


async def apply(c: InstillerConnector, **change: Any) -> ContactResult:
    (result,) = await c.apply_contacts([ContactChange(**{"email": ANN, "list": "newsletter", **change})])
    return result


def calls(esp: FakeInstillerUsers) -> list[tuple[str, str, dict[str, str]]]:
    """Each call's method, path and parameters besides the credentials."""
    out = []
    for s in esp.seen:
        given = s.query if s.method == "GET" else s.form
        out.append((s.method, s.path, {k: v for k, v in given.items() if k not in ("api_id", "api_key")}))
    return out


async def test_a_subscribe_makes_the_user_with_its_fields_then_subscribes_it(esp: FakeInstillerUsers) -> None:
    c = connector(esp)
    result = await apply(c, state=SubscriptionState.SUBSCRIBED, fields={"first_name": "Ann"})
    assert result == ContactResult(ANN, "newsletter", accepted=True, state=SubscriptionState.SUBSCRIBED)
    assert calls(esp) == [
        ("POST", "/users/add_or_update", {"email_address": ANN, "first_name": "Ann"}),
        (
            "GET",
            "/users/list_subscribe",
            {"email_address": ANN, "list_api_identifier": "newsletter", "subscribed": "Y"},
        ),
    ]
    assert {s.content_type for s in esp.seen if s.method == "POST"} == {"multipart/form-data"}
    assert esp.lists["newsletter"] == {ANN: "Y"}
    assert c.contacts_per_call == 1  # Instiller documents no batch of users


@pytest.mark.parametrize(
    ("state", "reported"),
    [(SubscriptionState.UNSUBSCRIBED, SubscriptionState.UNSUBSCRIBED), (SubscriptionState.REMOVED, None)],
)
async def test_an_opt_out_or_a_removal_is_subscribed_n(
    esp: FakeInstillerUsers, state: SubscriptionState, reported: SubscriptionState | None
) -> None:
    esp.users[ANN] = {}
    result = await apply(connector(esp), state=state)
    assert (result.accepted, result.state) == (True, reported)
    assert calls(esp) == [
        (
            "GET",
            "/users/list_subscribe",
            {"email_address": ANN, "list_api_identifier": "newsletter", "subscribed": "N"},
        )
    ]


async def test_fields_alone_are_one_add_or_update(esp: FakeInstillerUsers) -> None:
    result = await apply(connector(esp), state=None, fields={"city": "Leeds"})
    assert (result.accepted, result.state) == (True, None)
    assert calls(esp) == [("POST", "/users/add_or_update", {"email_address": ANN, "city": "Leeds"})]


async def test_a_double_opt_in_triggers_the_accounts_opt_in_workflow(esp: FakeInstillerUsers) -> None:
    c = connector(esp, double_opt_in=True)
    result = await apply(
        c, state=SubscriptionState.SUBSCRIBED, double_opt_in=True, fields={"first_name": "Ann"}
    )
    assert result.state is SubscriptionState.PENDING
    assert esp.triggered == [
        {
            "email_address": ANN,
            "workflow_api_identifier": "confirm_newsletter",
            "workflow_session_variables": '{"list_api_identifier":"newsletter"}',
            "first_name": "Ann",
        }
    ]
    assert esp.lists["newsletter"] == {}  # subscribed by the workflow once the user confirms


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"email": "ann@example.invalid"}, "invalid_parameter: email_address is not a valid email address"),
        ({"list": "weekly"}, "list_not_found: no list weekly"),
        ({"fields": {"api_key": "x"}}, "set by espbridge itself"),
        ({"fields": {"list_api_identifier": "x"}}, "set by espbridge itself"),
    ],
)
async def test_a_contact_instiller_refuses_is_a_result_with_the_reason(
    esp: FakeInstillerUsers, change: dict[str, Any], detail: str
) -> None:
    (result,) = await connector(esp).apply_contacts(
        [
            ContactChange(
                **{"email": ANN, "list": "newsletter", "state": SubscriptionState.SUBSCRIBED, **change}
            )
        ]
    )
    assert not result.accepted
    assert detail in result.detail
    assert API_KEY not in result.detail


async def test_an_outage_raises_so_the_batch_is_retried(esp: FakeInstillerUsers) -> None:
    esp.failing = [503]
    with pytest.raises(EspUnavailableError) as caught:
        await apply(connector(esp), state=SubscriptionState.SUBSCRIBED)
    assert API_KEY not in str(caught.value)


def test_a_double_opt_in_account_needs_its_workflow_at_the_start() -> None:
    with pytest.raises(ConfigurationError, match=r"options\.double_opt_in_workflow"):
        InstillerConnector(account(double_opt_in=True, double_opt_in_workflow=None), OFFLINE)


# --- ESP-side changes: the workflows' webhook calls ------------------------------------------------------


def webhook(body: Any) -> list[SubscriptionChange | BadRow]:
    c = InstillerConnector(account(), OFFLINE)
    items = c.parse_webhook({"Authorization": f"Bearer {WEBHOOK_SECRET}"}, orjson.dumps(body))
    return [i for i in items if isinstance(i, (SubscriptionChange, BadRow))]


def test_webhook_items_become_subscription_changes_with_stable_ids() -> None:
    item = {
        "event": "unsubscribe",
        "email_address": ANN,
        "list_api_identifier": "newsletter",
        "event_date": "2026-07-01 10:00:03",
    }
    (change,) = webhook(item)
    assert isinstance(change, SubscriptionChange)
    assert (change.esp, change.account, change.email, change.list) == ("instiller", "acme", ANN, "newsletter")
    assert (change.state, change.reason) == (SubscriptionState.UNSUBSCRIBED, "unsubscribe")
    assert change.occurred_at == datetime(2026, 7, 1, 9, 0, 3, tzinfo=UTC)  # London summer time
    (again,) = webhook([item])
    assert isinstance(again, SubscriptionChange)
    assert again.change_id == change.change_id
    (bad,) = webhook({**item, "event_date": "yesterday"})
    assert isinstance(bad, BadRow)
    assert "event_date" in bad.error


def test_webhooks_need_the_token_as_bearer_and_an_account_without_one_takes_none() -> None:
    c = InstillerConnector(account(), OFFLINE)
    with pytest.raises(WebhookAuthError):
        c.parse_webhook({"Authorization": "Bearer wrong"}, b"[]")
    plain = InstillerConnector(account().model_copy(update={"token": None}), OFFLINE)
    with pytest.raises(NotSupportedError):
        plain.parse_webhook({"Authorization": f"Bearer {WEBHOOK_SECRET}"}, b"[]")
