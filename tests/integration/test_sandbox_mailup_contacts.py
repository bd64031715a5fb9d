"""The mailup connector's subscription sync against the sandbox's ``mailup`` flavor (a real process):
pushes through MailUp's recipient calls into the flavor's contact book, changes made at MailUp
reported by its webhooks and read back by the connector, and the (S)FTP contacts file import."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from pydantic import SecretStr

from shared.esp import AccountConfig, ConnectorContext, connector_for
from shared.esp.base import ContactChange
from shared.esp.mailup import MailUpConnector
from shared.model.messages import ResponseEvent, SubscriptionChange, SubscriptionState
from shared.model.topics import Topic
from tests.fixtures.deployment import Deployment
from tests.fixtures.kafka import read_until
from tests.fixtures.processes import healthy, stop
from tests.fixtures.sandbox import SandboxClient, Sandboxes, WebhookReceiver
from tests.fixtures.servers import free_port
from tests.fixtures.waits import wait_for
from tests.integration.test_sandbox_mailup import Client
from tools.demo import FLAVORS

SUBSCRIBED, PENDING, UNSUBSCRIBED, REMOVED = (
    SubscriptionState.SUBSCRIBED,
    SubscriptionState.PENDING,
    SubscriptionState.UNSUBSCRIBED,
    SubscriptionState.REMOVED,
)
FAST = {"rate_limit_per_s": "0", "rate_unsubscribe": "0", "rate_complaint": "0"}
"""No 429s to wait out, and no unsubscribes of the broadcast simulation's own among the webhooks."""


@pytest.fixture
async def webhooks() -> AsyncIterator[WebhookReceiver]:
    """espbridge's webhook endpoint as the gatherer serves it (``/webhooks/<esp>/<account>``)."""
    async with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def connector(esp: SandboxClient, http: aiohttp.ClientSession) -> MailUpConnector:
    """The connector configured against the sandbox account as the demo configures it."""
    account = AccountConfig(
        esp="mailup",
        account=esp.account,
        connector="mailup",
        api_url=esp.api(),
        username=esp.account,
        password=SecretStr(esp.token),
        client_id="espbridge",
        client_secret=SecretStr(esp.token),
        token=SecretStr(esp.token),
        options={"list_id": 1, "rate_limit_per_s": 1000, "contact_fields": {"Town": 4}},
    )
    made = connector_for(account, ConnectorContext(http))
    assert isinstance(made, MailUpConnector)
    return made


async def states(esp: SandboxClient, email: str) -> dict[str, tuple[str, str]]:
    """The contact's (state, via) on each list, from the flavor's contact book."""
    return {r["list"]: (r["state"], r["via"]) for r in await esp.contacts(email=email)}


async def reported(
    mailup: MailUpConnector, webhooks: WebhookReceiver, count: int
) -> list[ResponseEvent | SubscriptionChange]:
    """The first ``count`` webhook calls, read by the connector as the gatherer reads them."""
    calls = await wait_for(
        lambda: webhooks.calls if len(webhooks.calls) >= count else None, 10, 0.02, what="webhook calls"
    )
    items: list[ResponseEvent | SubscriptionChange] = []
    for call in calls:
        (item,) = mailup.parse_webhook(call.headers, call.body)
        assert isinstance(item, ResponseEvent | SubscriptionChange), item
        items.append(item)
    return items


async def test_pushes_reach_the_lists_of_the_contact_book(
    sandbox: Sandboxes, http: aiohttp.ClientSession, webhooks: WebhookReceiver
) -> None:
    with sandbox("mailup", mailup_webhook_url=webhooks.url, **FAST) as esp:
        mailup = connector(esp, http)
        anna, bo, erin = "anna@example.com", "bo@example.com", "erin@example.com"
        results = await mailup.apply_contacts(
            [ContactChange(anna, "1", SUBSCRIBED, fields={"FirstName": "Anna", "Town": "Milan"})]
        )
        results += await mailup.apply_contacts([ContactChange(bo, "2", SUBSCRIBED, double_opt_in=True)])
        assert [(r.accepted, r.state) for r in results] == [(True, SUBSCRIBED), (True, PENDING)]
        assert await states(esp, anna) == {"1": ("subscribed", "api")}
        assert await states(esp, bo) == {"2": ("pending", "api")}
        client = Client(esp)
        await client.login()
        listed = await client.ok("GET", "/Console/List/1/Recipients/Subscribed")
        assert [(i["Email"], i["Fields"]) for i in listed["Items"]] == [
            (
                anna,
                [
                    {"Description": "FirstName", "Id": 1, "Value": "Anna"},
                    {"Description": "City", "Id": 4, "Value": "Milan"},
                ],
            )
        ]

        # Fields alone, then an unsubscribe, a resubscribe and a removal, each on its own list.
        results = [
            *await mailup.apply_contacts([ContactChange(anna, "1", None, fields={"LastName": "Rossi"})]),
            *await mailup.apply_contacts([ContactChange(anna, "1", UNSUBSCRIBED, reason="crm")]),
            *await mailup.apply_contacts([ContactChange(anna, "3", SUBSCRIBED)]),
            *await mailup.apply_contacts([ContactChange(bo, "2", REMOVED)]),
        ]
        assert [(r.accepted, r.state) for r in results] == [
            (True, SUBSCRIBED),
            (True, UNSUBSCRIBED),
            (True, SUBSCRIBED),
            (True, REMOVED),
        ]
        assert await states(esp, anna) == {"1": ("unsubscribed", "api"), "3": ("subscribed", "api")}
        assert await states(esp, bo) == {"2": ("removed", "api")}
        (book,) = await esp.contacts(email=anna, list_id="1")
        assert book["fields"] == {"FirstName": "Anna", "City": "Milan", "LastName": "Rossi"}
        again = await mailup.apply_contacts([ContactChange(anna, "1", SUBSCRIBED)])
        assert [(r.accepted, r.state) for r in again] == [(True, SUBSCRIBED)]

        # What MailUp refuses: a malformed address, a list the account does not have, a forced
        # opt-in after hard bounces.
        assert (await esp.contact_action("bounce_hard", erin, "1"))[0] == 200
        refused = [
            *await mailup.apply_contacts([ContactChange("erin@@example", "1", SUBSCRIBED)]),
            *await mailup.apply_contacts([ContactChange(anna, "9", UNSUBSCRIBED)]),
            *await mailup.apply_contacts([ContactChange(erin, "1", SUBSCRIBED)]),
        ]
        assert [r.accepted for r in refused] == [False, False, False]
        assert "Invalid email address" in refused[0].detail
        assert "MailUp knows no list 9" in refused[1].detail
        assert "unsubscribed after hard bounces" in refused[2].detail
        assert await states(esp, erin) == {"1": ("unsubscribed", "bounce")}
        (bounce,) = await reported(mailup, webhooks, 1)  # the bounce alone: pushes are not reported
        assert isinstance(bounce, SubscriptionChange)
        assert (bounce.email, bounce.state, bounce.reason) == (erin, UNSUBSCRIBED, "bounce_hard")


@pytest.mark.parametrize(
    ("action", "state", "reason"),
    [
        ("unsubscribe_link", UNSUBSCRIBED, "unsubscribe"),
        ("complaint", UNSUBSCRIBED, "complaint"),
        ("bounce_hard", UNSUBSCRIBED, "bounce_hard"),
        ("subscribe", SUBSCRIBED, "subscribe"),
        ("remove", REMOVED, "delete"),
    ],
)
async def test_a_change_made_at_mailup_is_reported_by_its_webhook_as_a_change_of_the_list(
    sandbox: Sandboxes,
    http: aiohttp.ClientSession,
    webhooks: WebhookReceiver,
    action: str,
    state: SubscriptionState,
    reason: str,
) -> None:
    with sandbox("mailup", mailup_webhook_url=webhooks.url, **FAST) as esp:
        mailup = connector(esp, http)
        await mailup.apply_contacts([ContactChange("carla@example.com", "2", SUBSCRIBED)])
        status, record = await esp.contact_action(action, "carla@example.com", "2")
        assert (status, record["state"]) == (200, state.value)
        (change,) = await reported(mailup, webhooks, 1)
        assert isinstance(change, SubscriptionChange)
        assert (change.email, change.account, change.list, change.state, change.reason) == (
            "carla@example.com",
            esp.account,
            "2",
            state,
            reason,
        )
        assert webhooks.calls[0].path == f"/webhooks/{esp.account}"


async def test_a_double_opt_in_confirmed_at_mailup_is_reported_subscribed(
    sandbox: Sandboxes, http: aiohttp.ClientSession, webhooks: WebhookReceiver
) -> None:
    with sandbox("mailup", mailup_webhook_url=webhooks.url, **FAST) as esp:
        mailup = connector(esp, http)
        (result,) = await mailup.apply_contacts([ContactChange("dan@example.com", "1", PENDING)])
        assert result.state is PENDING
        assert webhooks.calls == []  # a change an API caller made is not reported back
        assert (await esp.contact_action("confirm", "dan@example.com", "1"))[0] == 200
        (confirmed,) = await reported(mailup, webhooks, 1)
        assert isinstance(confirmed, SubscriptionChange)
        assert (confirmed.list, confirmed.state) == ("1", SUBSCRIBED)
        (again,) = mailup.parse_webhook(webhooks.calls[0].headers, webhooks.calls[0].body)
        assert isinstance(again, SubscriptionChange)
        assert again.change_id == confirmed.change_id, "the same call read twice is one change"


async def test_the_gatherer_publishes_what_the_flavor_reports(
    sandbox: Sandboxes, deployment: Deployment
) -> None:
    port = free_port()
    hook_url = f"http://127.0.0.1:{port}/webhooks/mailup/{{account}}"
    with sandbox("mailup", mailup_webhook_url=hook_url, **FAST) as esp, ExitStack() as stack:
        token_file = deployment.folder / "mailup.secret"
        token_file.write_text(esp.token)
        entry = FLAVORS["mailup"].account_entry("mailup", esp.account, esp.url, token_file)
        env = deployment.env(deployment.accounts_file([entry]), ESPBRIDGE_HTTP_PORT=str(port))
        gatherer = deployment.start(stack, "gatherer", env)
        await wait_for(lambda: healthy(port), timeout_s=60, what="the gatherer up")
        assert (await esp.contact_action("complaint", "zoe@example.com", "2"))[0] == 200
        records = await read_until(
            deployment.kafka, Topic.SUBSCRIPTION_CHANGES, lambda found: len(found) >= 1
        )
        (change,) = [SubscriptionChange.from_json(r.value or b"") for r in records]
        assert (change.email, change.esp, change.account, change.list, change.state, change.reason) == (
            "zoe@example.com",
            "mailup",
            esp.account,
            "2",
            UNSUBSCRIBED,
            "complaint",
        )
        assert stop(gatherer) == 0


async def test_an_unsubscribe_by_a_jobs_message_is_that_broadcasts_event(
    sandbox: Sandboxes, http: aiohttp.ClientSession, webhooks: WebhookReceiver
) -> None:
    with sandbox("mailup", mailup_webhook_url=webhooks.url, **FAST) as esp:
        client = Client(esp)
        await client.login()
        group, _ = await client.import_job("job-1", 42, 3)
        # the broadcast's recipients are subscribed to the group's list, so a link has a row to change
        assert {(r["email"], r["state"], r["via"]) for r in await esp.contacts(list_id="1")} == {
            (f"user{i}@example.com", "subscribed", "file") for i in range(3)
        }
        sending = await client.ok("POST", f"/Console/Group/{group}/Email/42/Send")
        await client.ok("POST", f"/Console/Email/Sendings/{sending['Id']}/Immediate")
        status, _ = await esp.contact_action("unsubscribe_link", "user1@example.com", "1", job="job-1")
        assert status == 200
        (event,) = await reported(connector(esp, http), webhooks, 1)
        assert isinstance(event, ResponseEvent)
        assert (event.broadcast_id, event.email, event.communication_key) == (
            "job-1",
            "user1@example.com",
            "user-1",
        )


def _contacts_file(esp: SandboxClient, list_id: str, name: str, lines: list[str]) -> None:
    esp.upload(f"import/{list_id}/{name}", ("\r\n".join(lines) + "\r\n").encode())


async def _result(esp: SandboxClient, list_id: str, outcome: str, name: str) -> dict[str, Any]:
    path: Path = esp.account_dir() / "import" / list_id / outcome / f"{name}.result.json"
    found = await wait_for(lambda: path.exists() or None, 10, 0.02, what=f"{outcome}/{name}")
    assert found
    result: dict[str, Any] = orjson.loads(path.read_bytes())
    return result


async def test_a_contacts_file_sets_each_contacts_status_on_its_list(
    sandbox: Sandboxes, http: aiohttp.ClientSession, webhooks: WebhookReceiver
) -> None:
    with sandbox("mailup", mailup_webhook_url=webhooks.url, **FAST) as esp:
        await esp.contact_action("subscribe", "kept@example.com", "2")
        await esp.contact_action("bounce_hard", "bounced@example.com", "2")
        await wait_for(lambda: len(webhooks.calls) == 2 or None, 10, 0.02, what="their webhook calls")
        webhooks.calls.clear()
        _contacts_file(
            esp,
            "2",
            "crm-20261122.csv",
            [
                "Email;Status;FirstName",
                "new@example.com;;Nora",
                "kept@example.com;unsubscribed;Kim",
                "asks@example.com;Pending;",
                "gone@example.com;removed;",
                "bounced@example.com;subscribed;Bea",
                "not an address;subscribed;",
                "odd@example.com;maybe;",
            ],
        )
        result = await _result(esp, "2", "done", "crm-20261122.csv")
        assert (result["imported"], result["states"]) == (
            4,
            {"subscribed": 1, "unsubscribed": 1, "pending": 1, "removed": 1},
        )
        assert [(e["line"], e["error"].split(" ")[0]) for e in result["errors"]] == [
            (6, "bounced@example.com"),
            (7, "invalid"),
            (8, "unknown"),
        ]
        book = {r["email"]: (r["state"], r["via"]) for r in await esp.contacts(list_id="2")}
        assert book == {
            "new@example.com": ("subscribed", "file"),
            "kept@example.com": ("unsubscribed", "file"),
            "asks@example.com": ("pending", "file"),
            "gone@example.com": ("removed", "file"),
            "bounced@example.com": ("unsubscribed", "bounce"),
        }
        assert not (esp.account_dir() / "import" / "2" / "crm-20261122.csv").exists()
        # A file MailUp cannot map is refused whole, and nothing of it is imported.
        _contacts_file(esp, "2", "bad.csv", ["Email;Shoe", "late@example.com;42"])
        failed = await _result(esp, "2", "failed", "bad.csv")
        assert "Shoe" in failed["error"]
        assert await esp.contacts(email="late@example.com") == []
        assert webhooks.calls == [], "MailUp calls no webhook for a bulk import"
        # The connector reads the file's states through MailUp's API like any other.
        (result_state,) = await connector(esp, http).apply_contacts(
            [ContactChange("asks@example.com", "2", None, fields={"LastName": "A"})]
        )
        assert (result_state.accepted, result_state.state) == (True, PENDING)


async def test_recipient_calls_answer_as_mailup_documents(sandbox: Sandboxes) -> None:
    with sandbox("mailup", **FAST) as esp:
        client = Client(esp)
        await client.login()
        body = {"Email": "ann@example.com", "Fields": [{"Id": 1, "Value": "Ann"}]}
        recipient = await client.ok("POST", "/Console/List/1/Recipient", body=body)
        assert isinstance(recipient, int)
        assert await client.ok("POST", "/Console/List/1/Recipient", body=body) == recipient  # an upsert
        flt = {"filterby": "\"Email=='ANN@example.com'\""}
        found = await client.ok("GET", "/Console/List/1/Recipients/Subscribed", params=flt)
        assert [i["idRecipient"] for i in found["Items"]] == [recipient]
        for other in ("Pending", "Unsubscribed"):
            assert (await client.ok("GET", f"/Console/List/1/Recipients/{other}", params=flt))["Items"] == []
        assert await client.ok("DELETE", f"/Console/List/1/Unsubscribe/{recipient}") is True
        found = await client.ok("GET", "/Console/List/1/Recipients/Unsubscribed", params=flt)
        assert [i["Email"] for i in found["Items"]] == ["ann@example.com"]
        assert await client.ok("POST", f"/Console/List/1/Subscribe/{recipient}") is True
        detail = await client.ok(
            "PUT",
            "/Console/Recipient/Detail",
            body={"idRecipient": recipient, "Fields": [{"Id": 2, "Value": "B"}]},
        )
        assert [f["Value"] for f in detail["Fields"]] == ["Ann", "B"]
        assert await client.ok("DELETE", f"/Console/List/1/Recipient/{recipient}") is True
        for method, path, answer in [
            ("DELETE", f"/Console/List/1/Recipient/{recipient}", 404),  # not on the list any more
            ("POST", "/Console/List/1/Subscribe/999", 404),
            ("POST", "/Console/List/4/Recipient", 404),
            ("GET", "/Console/List/1/Recipients/Everyone", 404),
        ]:
            status, error, _ = await client.call(method, path, body=body)
            assert (status, error["ErrorCode"]) == (answer, str(answer)), path
        for bad in (
            {"Email": "no-at-sign"},
            {"Email": "a@example.com", "Fields": [{"Id": 40, "Value": "x"}]},
        ):
            status, error, _ = await client.call("POST", "/Console/List/1/Recipient", body=bad)
            assert (status, error["ErrorName"]) == (400, "BadRequest")
        status, _, _ = await client.call(
            "GET", "/Console/List/1/Recipients/Subscribed", params={"filterby": "Email.Contains('a')"}
        )
        assert status == 400
