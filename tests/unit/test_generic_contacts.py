"""The generic connector's subscriptions against a fake of docs/generic-esp.md: the contact calls
(method, path, body, batching), refused contacts, outages, and the contacts webhook."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiohttp import web
from pydantic import SecretStr

from shared.esp import AccountConfig, BadRow, ConnectorContext, ImportState
from shared.esp.accounts import SubscriptionPolicy
from shared.esp.base import ContactChange, ContactResult, WebhookAuthError
from shared.esp.generic import MAX_CONTACTS, GenericConnector
from shared.esp.rest import EspUnavailableError
from shared.model.messages import SubscriptionChange, SubscriptionState
from tests.fixtures.fake_esp import FakeEsp, served
from tests.unit.test_messages import job

SUBSCRIBED, PENDING = SubscriptionState.SUBSCRIBED, SubscriptionState.PENDING
UNSUBSCRIBED, REMOVED = SubscriptionState.UNSUBSCRIBED, SubscriptionState.REMOVED


@dataclass
class FakeContacts(FakeEsp):
    """The contact calls and the import call as docs/generic-esp.md describes them."""

    base: str = "/api/v1/accounts/demo"
    bodies: list[tuple[str, str, Any]] = field(default_factory=list)
    """(method, path, JSON body) of each call."""
    failures: list[web.Response] = field(default_factory=list)
    """Answers given before any other, one a call (an outage, a 429)."""
    states: dict[tuple[str, str], str] = field(default_factory=dict)

    def application(self) -> web.Application:
        app = web.Application()
        for action in ("subscribe", "unsubscribe", "remove"):
            app.router.add_post(self.base + "/lists/{list_id}/" + action, self.contacts)
        app.router.add_patch(self.base + "/lists/{list_id}/contacts", self.contacts)
        app.router.add_post(self.base + "/imports", self.imports)
        return app

    async def imports(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.bodies.append((request.method, request.path.removeprefix(self.base), body))
        return web.json_response({"import_id": "imp-1", "state": "queued"}, status=202)

    async def contacts(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        path = request.path.removeprefix(self.base)
        self.bodies.append((request.method, path, body))
        if self.failures:
            return self.failures.pop(0)
        list_id, action = request.match_info["list_id"], path.rsplit("/", 1)[1]
        if list_id == "closed":
            return web.json_response(
                {"error": "invalid_list", "message": "list closed is closed"}, status=400
            )
        results = []
        for contact in body["contacts"]:
            email = contact["email"]
            if "_" in email.split("@")[1]:
                message = f"{email!r} is not a valid email address"
                results.append(
                    {"email": email, "accepted": False, "error": "invalid_email", "message": message}
                )
                continue
            state = {
                "subscribe": "pending" if body.get("double_opt_in") else "subscribed",
                "unsubscribe": "unsubscribed",
                "remove": "removed",
            }.get(action) or self.states.get((list_id, email), "subscribed")
            self.states[(list_id, email)] = state
            results.append({"email": email, "list": list_id, "accepted": True, "state": state})
        return web.json_response({"results": results})


esp = served(FakeContacts)


def account(url: str = "http://127.0.0.1:1/api", **policy: Any) -> AccountConfig:
    return AccountConfig(
        esp="sandbox",
        account="demo",
        api_url=url,
        token=SecretStr("t0k"),
        subscriptions=SubscriptionPolicy(**policy),
    )


def connector(esp: FakeContacts, **policy: Any) -> GenericConnector:
    return GenericConnector(account(esp.url, **policy), ConnectorContext(esp.http))


def change(email: str, state: SubscriptionState | None, list_id: str = "news", **more: Any) -> ContactChange:
    return ContactChange(email=email, list=list_id, state=state, **more)


async def test_each_state_takes_its_call_with_the_contacts_in_one_body(esp: FakeContacts) -> None:
    changes = [
        change("a@example.com", SUBSCRIBED, fields={"FirstName": "Ann"}),
        change("b@example.com", UNSUBSCRIBED, reason="crm opt-out"),
        change("c@example.com", REMOVED),
        change("d@example.com", None, fields={"City": "Oslo"}),
        change("e@example.com", SUBSCRIBED),
    ]
    results = await connector(esp).apply_contacts(changes)
    assert esp.bodies == [
        (
            "POST",
            "/lists/news/subscribe",
            {
                "contacts": [
                    {"email": "a@example.com", "fields": {"FirstName": "Ann"}},
                    {"email": "e@example.com"},
                ]
            },
        ),
        (
            "POST",
            "/lists/news/unsubscribe",
            {"contacts": [{"email": "b@example.com", "reason": "crm opt-out"}]},
        ),
        ("POST", "/lists/news/remove", {"contacts": [{"email": "c@example.com"}]}),
        (
            "PATCH",
            "/lists/news/contacts",
            {"contacts": [{"email": "d@example.com", "fields": {"City": "Oslo"}}]},
        ),
    ]
    assert {s.authorization for s in esp.seen} == {"Bearer t0k"}
    assert [(r.email, r.accepted, r.state) for r in results] == [
        ("a@example.com", True, SUBSCRIBED),
        ("b@example.com", True, UNSUBSCRIBED),
        ("c@example.com", True, REMOVED),
        ("d@example.com", True, SUBSCRIBED),
        ("e@example.com", True, SUBSCRIBED),
    ]


async def test_a_double_opt_in_subscribe_is_its_own_call_and_comes_back_pending(esp: FakeContacts) -> None:
    results = await connector(esp).apply_contacts(
        [change("a@example.com", SUBSCRIBED, double_opt_in=True), change("b@example.com", SUBSCRIBED)]
    )
    assert [(p, b.get("double_opt_in")) for _, p, b in esp.bodies] == [
        ("/lists/news/subscribe", True),
        ("/lists/news/subscribe", None),
    ]
    assert [r.state for r in results] == [PENDING, SUBSCRIBED]


async def test_lists_are_called_apart_and_a_list_id_is_one_path_segment(esp: FakeContacts) -> None:
    await connector(esp).apply_contacts(
        [change("a@example.com", SUBSCRIBED, "news"), change("b@example.com", SUBSCRIBED, "a:b.c")]
    )
    assert [p for _, p, _ in esp.bodies] == ["/lists/news/subscribe", "/lists/a:b.c/subscribe"]


async def test_a_full_batch_is_one_call(esp: FakeContacts) -> None:
    c = connector(esp)
    assert c.contacts_per_call == MAX_CONTACTS == 1000
    changes = [change(f"u{i}@example.com", SUBSCRIBED) for i in range(c.contacts_per_call)]
    results = await c.apply_contacts(changes)
    ((_, _, body),) = esp.bodies
    assert len(body["contacts"]) == 1000
    assert [r.email for r in results] == [c.email for c in changes]


async def test_a_refused_contact_carries_the_esps_reason_and_the_others_go_through(esp: FakeContacts) -> None:
    results = await connector(esp).apply_contacts(
        [
            change("a@example.com", SUBSCRIBED),
            change("b@exa_mple.com", SUBSCRIBED),
            change("c@example.com", SUBSCRIBED),
        ]
    )
    assert results[1] == ContactResult(
        "b@exa_mple.com",
        "news",
        accepted=False,
        detail="invalid_email: 'b@exa_mple.com' is not a valid email address",
    )
    assert [r.accepted for r in results] == [True, False, True]


async def test_a_list_the_esp_refuses_refuses_each_of_its_contacts(esp: FakeContacts) -> None:
    results = await connector(esp).apply_contacts(
        [change("a@example.com", SUBSCRIBED, "closed"), change("b@example.com", SUBSCRIBED, "news")]
    )
    assert [(r.accepted, r.detail) for r in results] == [
        (False, "the ESP refused the call: list closed is closed"),
        (True, ""),
    ]


async def test_fields_no_esp_can_take_are_refused_without_a_call(esp: FakeContacts) -> None:
    (result,) = await connector(esp).apply_contacts(
        [change("a@example.com", None, fields={"first name": "A"})]
    )
    assert (result.accepted, "not field names" in result.detail) == (False, True)
    assert esp.bodies == []


async def test_an_outage_is_retried_and_then_answered(esp: FakeContacts) -> None:
    esp.failures = [web.Response(status=503), web.Response(status=429, headers={"Retry-After": "0"})]
    (result,) = await connector(esp).apply_contacts([change("a@example.com", UNSUBSCRIBED)])
    assert (result.accepted, result.state) == (True, UNSUBSCRIBED)
    assert len(esp.bodies) == 3


async def test_an_outage_that_lasts_goes_to_the_caller_as_transient(esp: FakeContacts) -> None:
    esp.failures = [web.Response(status=503, headers={"Retry-After": "0"}) for _ in range(3)]
    with pytest.raises(EspUnavailableError, match="503"):
        await connector(esp).apply_contacts([change("a@example.com", UNSUBSCRIBED)])


async def test_an_import_names_the_broadcast_list_when_the_account_syncs_lists(esp: FakeContacts) -> None:
    remote = "sandbox/demo/drop/job-1.csv"
    imported = await connector(esp, lists=["news", "offers"], broadcast_list="offers").start_import(
        remote, job()
    )
    await connector(esp).start_import(remote, job())
    assert imported.state is ImportState.QUEUED
    assert [b.get("list_id") for _, _, b in esp.bodies] == ["offers", None]


# --- the contacts webhook --------------------------------------------------------------------------

WEBHOOK = GenericConnector(account(), ConnectorContext(http=None))  # type: ignore[arg-type]
BEARER = {"Authorization": "Bearer t0k"}


def item(**overrides: str) -> dict[str, str]:
    return {
        "id": "3fa1c2-17",
        "email": "Ann@Example.com",
        "list": "news",
        "state": "unsubscribed",
        "reason": "complaint",
        "via": "complaint",
        "changed_at": "2026-11-22T10:00:03Z",
        **overrides,
    }


def test_a_webhook_change_becomes_a_subscription_change_with_the_same_id_every_time() -> None:
    body = orjson.dumps([item(), item(id="3fa1c2-18", state="subscribed", reason="confirm")])
    first, confirmed = WEBHOOK.parse_webhook(BEARER, body)
    assert isinstance(first, SubscriptionChange)
    assert isinstance(confirmed, SubscriptionChange)
    assert (first.email, first.esp, first.account, first.list, first.state, first.reason) == (
        "ann@example.com",
        "sandbox",
        "demo",
        "news",
        UNSUBSCRIBED,
        "complaint",
    )
    assert first.occurred_at == datetime(2026, 11, 22, 10, 0, 3, tzinfo=UTC)
    assert confirmed.state is SUBSCRIBED
    (again,) = WEBHOOK.parse_webhook(BEARER, orjson.dumps(item()))
    assert isinstance(again, SubscriptionChange)
    assert again.change_id == first.change_id != confirmed.change_id


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic t0k"}])
def test_a_webhook_call_without_the_accounts_token_is_refused(headers: dict[str, str]) -> None:
    with pytest.raises(WebhookAuthError):
        WEBHOOK.parse_webhook(headers, orjson.dumps([item()]))


def test_a_bad_webhook_item_is_a_bad_row_and_the_good_ones_still_count() -> None:
    body = orjson.dumps(
        [item(state="bouncing"), item(email="nobody"), "text", item(changed_at="yesterday"), item()]
    )
    parsed = WEBHOOK.parse_webhook(BEARER, body)
    bad = {p.line: p.error for p in parsed if isinstance(p, BadRow)}
    assert sorted(bad) == [1, 2, 3, 4]
    assert "bouncing" in bad[1]
    assert isinstance(parsed[4], SubscriptionChange)
