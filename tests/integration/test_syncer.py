"""The syncer as a process: an ESP's change reaches crm.subscriptions with its follow-ons (written,
and published as push requests), a producer's request is written to the CRM and pushed to the ESP
(the sandbox's generic flavor through the generic connector), and bad requests and contacts the ESP
refused are dead letters that say why."""

from __future__ import annotations

import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from shared.infra.db import connect
from shared.infra.settings import KafkaSettings
from shared.model.messages import (
    DeadLetter,
    RequestOrigin,
    SubscriptionChange,
    SubscriptionRequest,
    SubscriptionState,
)
from shared.model.topics import Topic
from tests.fixtures.capture import Capture, crm_write, espbridge_write
from tests.fixtures.deployment import Deployment
from tests.fixtures.kafka import Record, committed, count_records, produce, read_until
from tests.fixtures.processes import log_messages, log_records, stop
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
    records = await esp.contacts(email, list_id)
    return records[0] if records else None


@dataclass(frozen=True)
class Synced:
    """A test's sandbox ESP and the accounts file of the syncer's accounts on it."""

    esp: SandboxClient
    accounts: Path


@pytest.fixture
def synced(deployment: Deployment, sandbox: Sandboxes) -> Synced:
    esp = sandbox("generic")
    return Synced(esp, deployment.accounts_file(syncer_accounts(deployment, esp)))


async def test_the_syncer_keeps_the_crm_and_the_esp_in_sync_and_dead_letters_bad_requests(
    deployment: Deployment, synced: Synced
) -> None:
    kafka, esp, accounts = deployment.kafka, synced.esp, synced.accounts
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
        assert "'not an address' is not an email address" in said["bad email"]
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


async def _finished(kafka: KafkaSettings, group: str, topic: Topic, records: int) -> bool:
    return await committed(kafka, group, topic) >= records


async def test_with_capture_on_the_crms_own_changes_reach_the_esp_and_espbridges_own_writes_never(
    deployment: Deployment, synced: Synced, capture: Capture
) -> None:
    kafka, esp = deployment.kafka, synced.esp
    env = deployment.env(
        synced.accounts,
        ESPBRIDGE_SYNCER_CAPTURE="true",
        ESPBRIDGE_CONNECT_URL=capture.connect.url,
        ESPBRIDGE_CONNECT_SECRETS_FILE=capture.connect.require_secrets_file(),
    )
    crm = await connect(deployment.database)
    insert = (
        "INSERT INTO crm.subscriptions (email, esp, account, list, state, reason) "
        "VALUES ($1, $2, $3, 'news', $4, $5)"
    )
    with ExitStack() as stack:
        proc = deployment.start(stack, "syncer", env)
        # the syncer posts the connector at start: running once the syncer is
        await wait_for(lambda: _capturing(capture), timeout_s=120, what="the capture running")
        await espbridge_write(crm, insert, ANN, esp.esp, esp.account, "subscribed", "")
        await crm_write(crm, insert, "dee@example.com", esp.esp, esp.account, "unsubscribed", "asked us")
        dee = await wait_for(lambda: sandbox_contact(esp, "dee@example.com", "news"), what="dee at the ESP")
        assert dee["state"] == "unsubscribed"
        # both captured changes handled: espbridge's own made no request
        await wait_for(lambda: _finished(kafka, "syncer-capture", Topic.CRM_CAPTURED, 2), what="both handled")
        (record,) = await read_until(kafka, Topic.SUBSCRIPTION_REQUESTS, lambda rs: bool(rs))
        assert await count_records(kafka, Topic.SUBSCRIPTION_REQUESTS) == 1
        pushed = SubscriptionRequest.from_json(record.value or b"")
        assert (pushed.email, pushed.origin, pushed.source, pushed.reason) == (
            "dee@example.com",
            RequestOrigin.CAPTURE,
            "crm",
            "asked us",
        )
        assert stop(proc) == 0
    await crm.close()
    assert await sandbox_contact(esp, ANN, "news") is None
    assert "capture enabled" in log_messages(deployment.folder / "syncer.log")


async def _capturing(capture: Capture) -> bool:
    return (await capture.status()).running
