"""The generic_sftp connector's subscriptions against the sandbox's generic_sftp flavor over the
SFTP server: contacts files the flavor applies, and opt-outs on the ESP side in the broadcast's
response files."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shared.esp import AccountConfig, BadRow, ConnectorContext
from shared.esp.base import ContactChange
from shared.esp.generic_sftp import GenericSftpConnector
from shared.infra.sftp import SftpPool
from shared.model.messages import EventType, ResponseEvent, SubscriptionState
from tests.fixtures.sandbox import SandboxClient, Sandboxes
from tests.fixtures.servers import Servers
from tests.fixtures.waits import wait_for

FLAVOR = "generic_sftp"


@pytest.fixture
async def pool(servers: Servers) -> AsyncIterator[SftpPool]:
    opened = SftpPool(servers.sftp)
    yield opened
    await opened.close()


@pytest.fixture
def site(sandbox: Sandboxes, sftp_folder: tuple[str, Path]) -> tuple[SandboxClient, str]:
    """The sandbox playing the ESP on the SFTP server's folder, and the account's remote root."""
    remote, local = sftp_folder
    return sandbox(FLAVOR, root=local), f"{remote}/{FLAVOR}/demo"


def connector(pool: SftpPool, sftp_root: str) -> GenericSftpConnector:
    account = AccountConfig(esp=FLAVOR, account="demo", connector=FLAVOR, sftp_root=sftp_root)
    return GenericSftpConnector(account, ConnectorContext(http=None, sftp=pool))  # type: ignore[arg-type]


def change(email: str, state: SubscriptionState | None, list_id: str = "news", **more: Any) -> ContactChange:
    return ContactChange(email=email, list=list_id, state=state, **more)


def processed(esp: SandboxClient) -> list[str]:
    folder = esp.account_dir() / "contacts" / "processed"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


async def states_after(esp: SandboxClient, files: int) -> dict[tuple[str, str], dict[str, Any]]:
    """The contact records once ``files`` contacts files are processed."""
    await wait_for(lambda: len([n for n in processed(esp) if "rejected" not in n]) >= files, 15, 0.05)
    return {(r["list"], r["email"]): r for r in await esp.contacts()}


async def test_contacts_files_subscribe_update_unsubscribe_and_remove(
    site: tuple[SandboxClient, str], pool: SftpPool
) -> None:
    esp, root = site
    c = connector(pool, root)
    results = await c.apply_contacts(
        [
            change("ann@example.com", SubscriptionState.SUBSCRIBED, fields={"FirstName": "Ann"}),
            change("bob@example.com", SubscriptionState.SUBSCRIBED),
            change("bad@exa_mple.com", SubscriptionState.SUBSCRIBED),
            change("cy@example.com", SubscriptionState.UNSUBSCRIBED, "offers", reason="crm opt-out"),
        ]
    )
    assert [r.accepted for r in results] == [True, True, False, True]
    assert results[2].detail == "the ESP refuses the address 'bad@exa_mple.com'"
    records = await states_after(esp, 1)
    assert {k: r["state"] for k, r in records.items()} == {
        ("news", "ann@example.com"): "subscribed",
        ("news", "bob@example.com"): "subscribed",
        ("offers", "cy@example.com"): "unsubscribed",
    }
    assert records[("offers", "cy@example.com")]["reason"] == "crm opt-out"

    await c.apply_contacts(
        [
            change("ann@example.com", None, fields={"City": "Oslo"}),
            change("bob@example.com", SubscriptionState.REMOVED),
        ]
    )
    records = await states_after(esp, 2)
    assert records[("news", "ann@example.com")]["fields"] == {"FirstName": "Ann", "City": "Oslo"}
    assert (records[("news", "ann@example.com")]["state"], records[("news", "bob@example.com")]["state"]) == (
        "subscribed",
        "removed",
    )
    assert list((esp.account_dir() / "contacts").glob("*.txt")) == []  # each file was taken once


async def test_rows_the_esp_refuses_are_reported_beside_the_processed_file(
    site: tuple[SandboxClient, str],
) -> None:
    esp, _ = site
    text = (
        "Email\tList\tStatus\tFirstName\n"
        "ann@example.com\tnews\tsubscribed\tAnn\n"
        "bad@exa_mple.com\tnews\tsubscribed\t\n"
        "bob@example.com\tnews\tpending\t\n"
        "cy@example.com\tnews\t\tCy\n"
        "dee@example.com\tnews\n"
    )
    esp.upload("contacts/by-hand.txt", text.encode())
    records = await states_after(esp, 1)
    assert list(records) == [("news", "ann@example.com")]
    report = (esp.account_dir() / "contacts" / "processed" / "by-hand.rejected.txt").read_text()
    assert report.splitlines() == [
        "Line\tError\tEmail",
        "3\tinvalid email\tbad@exa_mple.com",
        "4\tunknown Status 'pending' (subscribed, unsubscribed, removed, or empty)\tbob@example.com",
        "5\tnot on list news: an empty Status only updates a contact's fields\tcy@example.com",
        "6\texpected 4 fields, found 2\t",
    ]


async def test_an_esp_side_opt_out_is_a_row_of_the_broadcast_it_came_from(
    site: tuple[SandboxClient, str], pool: SftpPool
) -> None:
    esp, root = site
    esp.upload("drop/job-9.txt", b"Email\tCommunicationKey\nann@example.com\tk1\nbob@example.com\tk2\n")
    await esp.complete_manifest("job-9")
    assert {r["email"]: r["state"] for r in await esp.contacts(list_id="newsletter")} == {
        "ann@example.com": "subscribed",
        "bob@example.com": "subscribed",
    }
    status, answer = await esp.contact_action("unsubscribe_link", "ann@example.com", "newsletter")
    assert (status, answer["error"]) == (400, "job_required")
    assert (await esp.contact_action("unsubscribe_link", "ann@example.com", "newsletter", job="job-9"))[
        0
    ] == 200
    assert (await esp.contact_action("complaint", "bob@example.com", "newsletter", job="job-9"))[0] == 200

    c = connector(pool, root)
    events: list[ResponseEvent] = []
    for path in sorted((esp.account_dir() / "responses").glob("*_FERGE_unsubscribes_c*.txt")):
        for item in c.parse_response_file(path, f"{root}/responses/{path.name}"):
            assert not isinstance(item, BadRow), item
            events.append(item)
    assert sorted((e.email, e.communication_key, e.broadcast_id, e.type) for e in events) == [
        ("ann@example.com", "k1", "job-9", EventType.UNSUBSCRIBE),
        ("bob@example.com", "k2", "job-9", EventType.UNSUBSCRIBE),
    ]
