"""The syncer as a process: an ESP's change reaches crm.subscriptions with its follow-ons (written,
and published as push requests), a producer's request is written to the CRM and pushed to the ESP
(the sandbox's generic flavor through the generic connector), and bad requests and contacts the ESP
refused are dead letters that say why."""

from __future__ import annotations

import uuid
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from shared.infra.db import connect
from shared.model.messages import (
    DeadLetter,
    RequestOrigin,
    SubscriptionChange,
    SubscriptionRequest,
    SubscriptionState,
)
from shared.model.topics import Topic
from tests.fixtures.deployment import Deployment
from tests.fixtures.kafka import Record, produce, read_until
from tests.fixtures.processes import log_records, stop
from tests.fixtures.sandbox import SandboxClient, Sandboxes
from tests.fixtures.waits import wait_for
from tools.demo import FLAVORS

ANN, BO = "ann@example.com", "bo@example.com"


def syncer_accounts(deployment: Deployment, esp: SandboxClient) -> list[dict[str, Any]]:
    """The sandbox's account syncing two lists (an unsubscribe covers both), and one syncing none."""
    token = deployment.folder / "sandbox.token"
    token.write_text(esp.token)
    synced = FLAVORS["sandbox"].account_entry(esp.esp, esp.account, esp.url, token)
    synced["subscriptions"] = {"lists": ["news", "offers"], "unsubscribe_scope": "account"}
    return [synced, deployment.offline_account(esp.esp, "quiet")]


def request(esp: SandboxClient, email: str, **more: Any) -> bytes:
    doc = {
        "request_id": str(uuid.uuid4()),
        "email": email,
        "esp": esp.esp,
        "account": esp.account,
        "list": "news",
        "state": "subscribed",
        "requested_at": datetime.now(UTC).isoformat(),
    } | more
    return orjson.dumps(doc)


async def sandbox_contact(esp: SandboxClient, email: str, list_id: str) -> dict[str, Any] | None:
    """The sandbox's record of a contact on a list, if it has one."""
    url = f"{esp.api()}/_sandbox/contacts"
    async with esp.http.get(url, params={"email": email, "list": list_id}, headers=esp.headers) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    records = body if isinstance(body, list) else body.get("contacts", body.get("records", []))
    return next((r for r in records if r.get("email") == email and r.get("list") == list_id), None)


async def test_the_syncer_keeps_the_crm_and_the_esp_in_sync_and_dead_letters_bad_requests(
    deployment: Deployment, sandbox: Sandboxes
) -> None:
    kafka = deployment.kafka
    esp = sandbox("generic")
    accounts = deployment.accounts_file(syncer_accounts(deployment, esp))
    unsubscribed = SubscriptionChange(
        change_id=uuid.uuid4(),
        email=ANN,
        esp=esp.esp,
        account=esp.account,
        list="news",
        state=SubscriptionState.UNSUBSCRIBED,
        reason="unsubscribe",
        occurred_at=datetime.now(UTC) - timedelta(seconds=1),
    )
    bad = {
        "unknown account": request(esp, BO, account="nobody"),
        "unknown list": request(esp, BO, list="weekly"),
        "no lists": request(esp, BO, account="quiet"),
        "bad email": request(esp, "not an address"),
        "refused by the ESP": request(esp, "cy@example.com", fields={"First Name": "Cy"}),
    }
    crm = await connect(deployment.database)
    with ExitStack() as stack:
        exports = deployment.folder / "unsubscribers"
        exports.mkdir()
        env = deployment.env(
            accounts, ESPBRIDGE_SYNCER_EXPORT_SCHEDULE="0 6 * * *", ESPBRIDGE_SYNCER_EXPORT_DIR=str(exports)
        )
        proc = deployment.start(stack, "syncer", env)
        await produce(kafka, Topic.SUBSCRIPTION_CHANGES, [(ANN.encode(), unsubscribed.to_json())] * 2)
        await produce(
            kafka,
            Topic.SUBSCRIPTION_REQUESTS,
            [(BO.encode(), request(esp, BO, fields={"FirstName": "Bo"})), *((b"x", v) for v in bad.values())],
        )

        async def rows() -> list[Any] | None:
            found = await crm.fetch(
                "SELECT email, list, state, source, written_by FROM crm.subscriptions ORDER BY email, list"
            )
            return found if len(found) == 4 else None

        assert [tuple(r) for r in await wait_for(rows, what="the CRM's rows")] == [
            (ANN, "news", "unsubscribed", "sandbox/demo", "espbridge"),
            (ANN, "offers", "unsubscribed", "sandbox/demo", "espbridge"),  # the account's other list
            (BO, "news", "subscribed", "crm", "espbridge"),
            ("cy@example.com", "news", "subscribed", "crm", "espbridge"),  # written, then refused
        ]
        outcomes = await crm.fetch("SELECT origin, outcome FROM crm.subscription_log ORDER BY origin")
        assert sorted(map(tuple, outcomes)) == [
            ("esp", "applied"),
            ("follow_on", "applied"),
            ("producer", "applied"),
            ("producer", "applied"),
        ]  # the change that came twice is logged once

        def follow_ons(records: list[Record]) -> list[SubscriptionRequest]:
            # the bad requests on the topic are not read; the follow-ons are the syncer's own
            requests = [
                SubscriptionRequest.from_json(r.value) for r in records if r.value and b"follow_on" in r.value
            ]
            return [r for r in requests if r.origin is RequestOrigin.FOLLOW_ON]

        (follow_on,) = follow_ons(
            await read_until(kafka, Topic.SUBSCRIPTION_REQUESTS, lambda rs: bool(follow_ons(rs)))
        )
        assert (follow_on.email, follow_on.list, follow_on.state, follow_on.source) == (
            ANN,
            "offers",
            SubscriptionState.UNSUBSCRIBED,
            "sandbox/demo",
        )

        pushed = await wait_for(lambda: sandbox_contact(esp, BO, "news"), what="bo subscribed at the ESP")
        assert (pushed["state"], pushed["fields"]) == ("subscribed", {"FirstName": "Bo"})
        followed = await wait_for(
            lambda: sandbox_contact(esp, ANN, "offers"), what="ann's follow-on at the ESP"
        )
        assert followed["state"] == "unsubscribed"
        assert await sandbox_contact(esp, ANN, "news") is None  # never pushed back where it came from

        def syncer_letters(records: list[Record]) -> list[DeadLetter]:
            letters = [DeadLetter.from_json(r.value or b"") for r in records]
            return [d for d in letters if d.service == "syncer"]

        letters = syncer_letters(
            await read_until(kafka, Topic.DEADLETTER, lambda rs: len(syncer_letters(rs)) >= len(bad))
        )
        reasons = {d.payload: d.message for d in letters}
        said = {name: reasons[payload] for name, payload in bad.items()}
        assert said["unknown account"] == (
            "ESP account sandbox/nobody is not configured (configured: sandbox/demo, sandbox/quiet)"
        )
        assert said["unknown list"] == (
            "list 'weekly' is not one of the lists ESP account sandbox/demo syncs (news, offers)"
        )
        assert said["no lists"] == (
            "ESP account sandbox/quiet syncs no lists (its subscriptions.lists is empty): "
            "nothing is pushed to it"
        )
        assert said["bad email"].startswith("not a valid SubscriptionRequest: email: ")
        refused = next(d for d in letters if d.payload == bad["refused by the ESP"])
        assert (refused.error_class, refused.context) == (
            "ContactRefused",
            {"esp": "sandbox", "account": "demo", "list": "news"},
        )
        assert said["refused by the ESP"].startswith("sandbox/demo refused cy@example.com on list 'news': ")
        assert "First Name" in said["refused by the ESP"]
        # the unsubscriber export runs beside: the latest scheduled day's file, written at start
        assert await wait_for(lambda: [p for p in exports.iterdir() if p.is_file()], what="the export's file")
        assert stop(proc) == 0
    await crm.close()
    lags = [r["crm_lag_s"] for r in log_records(deployment.folder / "syncer.log") if "crm_lag_s" in r]
    assert len(lags) == 1
    assert 0 <= lags[0] < 60
