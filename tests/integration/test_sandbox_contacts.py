"""The sandbox's contact book through its control routes (every flavor): ESP-side changes made for
tests and the demo, the records they leave, and both kept across a restart."""

from __future__ import annotations

import csv
import io

from tests.fixtures.sandbox import Sandboxes
from tests.fixtures.waits import wait_for


def states(records: list[dict[str, object]]) -> dict[tuple[object, object], object]:
    return {(r["list"], r["email"]): r["state"] for r in records}


async def test_control_actions_change_the_contact_and_answer_its_record(sandbox: Sandboxes) -> None:
    esp = sandbox()
    status, record = await esp.contact_action("subscribe", "Ann@Example.com", "news")
    assert status == 200
    assert {k: record[k] for k in ("email", "list", "state", "via", "reason")} == {
        "email": "ann@example.com",
        "list": "news",
        "state": "subscribed",
        "via": "link",
        "reason": "subscribe",
    }
    for action, state, via in [
        ("unsubscribe_link", "unsubscribed", "link"),
        ("complaint", "unsubscribed", "complaint"),
        ("bounce_hard", "unsubscribed", "bounce"),
        ("remove", "removed", "api"),
    ]:
        status, record = await esp.contact_action(action, "ann@example.com", "news")
        assert (status, record["state"], record["via"]) == (200, state, via), action
    await esp.contact_action("complaint", "bob@example.com", "offers")
    assert states(await esp.contacts(email="ANN@example.com")) == {("news", "ann@example.com"): "removed"}
    assert states(await esp.contacts(list_id="offers")) == {("offers", "bob@example.com"): "unsubscribed"}
    assert len(await esp.contacts()) == 2


BAD_REQUESTS = [
    ({"email": "ann@exa_mple.com", "list": "news", "action": "subscribe"}, 400, "invalid_email"),
    ({"email": "ann@example.com", "list": "news", "action": "resubscribe"}, 400, "invalid_request"),
    ({"email": "ann@example.com", "list": "news", "action": "confirm"}, 409, "contact_not_pending"),
    (
        {"email": "ann@example.com", "list": "news", "action": "complaint", "job": "job-x"},
        404,
        "send_not_found",
    ),
]
"""Bad control requests: (body, status, error code)."""


async def test_a_bad_control_request_is_refused_and_changes_nothing(sandbox: Sandboxes) -> None:
    esp = sandbox()  # one sandbox for every case: starting one costs more than the cases
    answers = []
    for body, _, _ in BAD_REQUESTS:
        async with esp.http.post(f"{esp.api()}/_sandbox/contacts", json=body, headers=esp.headers) as resp:
            answers.append((resp.status, (await resp.json())["error"]))
    assert answers == [(status, error) for _, status, error in BAD_REQUESTS]
    assert await esp.contacts() == []


async def test_the_control_routes_need_the_token(sandbox: Sandboxes) -> None:
    esp = sandbox()
    async with esp.http.get(f"{esp.api()}/_sandbox/contacts") as resp:
        assert resp.status == 401


def list_file(rows: list[list[str]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue().encode()


async def test_an_imported_list_subscribes_its_recipients_and_a_restart_keeps_the_book(
    sandbox: Sandboxes,
) -> None:
    esp = sandbox()
    await esp.contact_action("unsubscribe_link", "user1@example.com", "news")
    rows = [["Email", "CommunicationKey"], *([f"user{i}@example.com", f"k{i}"] for i in range(3))]
    file = esp.upload("drop/job-1.csv", list_file(rows))
    body = {"file": file, "external_id": "job-1", "list_id": "news"}
    async with esp.http.post(f"{esp.api()}/imports", json=body, headers=esp.headers) as resp:
        assert resp.status == 202
        import_id = (await resp.json())["import_id"]

    async def done() -> bool:
        async with esp.http.get(f"{esp.api()}/imports/{import_id}", headers=esp.headers) as resp:
            return bool((await resp.json())["state"] == "done")

    await wait_for(done, 30, 0.05, what="the import")
    expected = {
        ("news", "user0@example.com"): "subscribed",
        ("news", "user1@example.com"): "unsubscribed",  # an opt-out stays one
        ("news", "user2@example.com"): "subscribed",
    }
    assert states(await esp.contacts(list_id="news")) == expected
    esp.stop_cleanly()

    again = sandbox(root=esp.root, token=esp.token)
    assert states(await again.contacts(list_id="news")) == expected
    status, record = await again.contact_action("complaint", "user0@example.com", "news")
    assert (status, record["state"]) == (200, "unsubscribed")
