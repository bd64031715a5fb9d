"""The optimizely connector's subscription sync against the fake Optimizely of the connector tests,
held to Optimizely's OpenAPI document by the contract proxy (both sides, every call).

The fake adds recipient lists, opt-in processes, the unsubscribe list and the blocklist as
docs/connectors/optimizely.md ("Subscriptions") describes them; the tests assert every call's
method, path, query and body, the batching, what a refused contact says and an outage's retry.
Webhook items that report a contact's opt-in or opt-out become subscription changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import orjson
import pytest
from aiohttp import web

from shared.esp import AccountConfig, ConnectorContext
from shared.esp.accounts import SubscriptionPolicy
from shared.esp.base import BadRow, ContactChange, ContactResult
from shared.esp.optimizely import MAX_UNSUBSCRIBE_IDS, OptimizelyConnector
from shared.esp.rest import EspUnavailableError
from shared.model.errors import ConfigurationError
from shared.model.messages import EventType, ResponseEvent, SubscriptionChange, SubscriptionState
from tests.fixtures.contract import checked_fake
from tests.fixtures.fake_esp import OFFLINE
from tests.unit.test_optimizely_connector import SECRET, FakeOptimizely, account, basic, error

SUBSCRIBED = SubscriptionState.SUBSCRIBED
UNSUBSCRIBED = SubscriptionState.UNSUBSCRIBED
PENDING = SubscriptionState.PENDING
REMOVED = SubscriptionState.REMOVED
LISTS = ("4001", "4002")
SINGLE, DOUBLE = 100, 102
HOOK_AUTH = {"Authorization": basic("espbridge", SECRET)}


@dataclass
class Recipient:
    """A recipient on one recipient list of the fake."""

    data: dict[str, Any]
    pending: bool = False


@dataclass
class FakeContacts(FakeOptimizely):
    """The fake Optimizely with recipient lists (4001, 4002), opt-in processes (100 single, 102
    double), the client's unsubscribe list (or per list) and the blocklist."""

    lists: dict[str, dict[str, Recipient]] = field(default_factory=lambda: {i: {} for i in LISTS})
    processes: dict[int, str] = field(default_factory=lambda: {SINGLE: "single", DOUBLE: "double"})
    unsubscribed: dict[str, set[str]] = field(default_factory=dict)  # recipient → lists ("" = every)
    blocked: set[str] = field(default_factory=set)
    list_based: bool = False  # the unsubscribe list is recipient-list based (support's setting)
    bodies: list[Any] = field(default_factory=list)  # the JSON and form bodies, in order of arrival

    def valid(self, recipient: str, list_id: str) -> str | None:
        """Why the recipient cannot be mailed on the list (``validationFailedReason``), or None."""
        if recipient in self.blocked:
            return "blacklisted"
        if self.unsubscribed.get(recipient, set()) & {"", list_id}:
            return "unsubscribed"
        if recipient not in self.lists[list_id]:
            return "not_found"
        return None

    async def route(self, request: web.Request, tail: str) -> web.Response:
        method, parts = request.method, tail.split("/")
        query = dict(parse_qsl(request.query_string, keep_blank_values=True))
        if tail == "unsubscribes" and method == "GET" and "recipientIds" in query:
            return self.unsubscribes_of(query)
        if tail == "unsubscribes" and method in ("POST", "DELETE"):
            return await self.unsubscribe(request, query)
        if tail == "recipients" and method == "GET":
            return self.validity(query)
        if parts[0] == "recipients" and len(parts) in (2, 3) and parts[1] in self.lists:
            if method == "PUT" and len(parts) == 2:
                return await self.add_all(parts[1], await request.json())
            if method == "POST" and len(parts) == 2:
                return await self.add_one(parts[1], dict(await request.post()))
            if method == "PUT" and parts[2:] == ["modify"]:
                return await self.modify(parts[1], await request.json())
            if method == "DELETE" and len(parts) == 2:
                assert query.get("recipientIds"), "a DELETE without recipientIds empties the list"
                for recipient in query["recipientIds"].split(","):
                    self.lists[parts[1]].pop(recipient, None)
                return web.Response(status=204)
        if parts[0] == "recipients" and len(parts) == 2 and method != "GET":
            return error(404, f"no recipient list {parts[1]}")
        return await super().route(request, tail)

    async def add_all(self, list_id: str, body: dict[str, Any]) -> web.Response:
        """``PUT /recipients/{listId}``: existing, blocklisted and unsubscribed ones fail."""
        self.bodies.append(body)
        process = body.get("optinProcessId")
        if process is not None and self.processes.get(process) == "double":
            return error(409, "The indicated opt-in process is not suitable for adding recipients.")
        failed = []
        for r in body["recipients"]:
            if r["id"] in self.lists[list_id] or self.valid(r["id"], list_id) != "not_found":
                failed.append(r["id"])
            else:
                self.lists[list_id][r["id"]] = Recipient(dict(r.get("data", {})))
        return web.json_response({"count": len(body["recipients"]) - len(failed), "failedIds": failed})

    async def add_one(self, list_id: str, form: dict[str, Any]) -> web.Response:
        """``POST /recipients/{listId}``: 202 through a double opt-in process, else 201."""
        self.bodies.append(form)
        recipient = str(form["recipientId"])
        if recipient in self.lists[list_id] or self.valid(recipient, list_id) != "not_found":
            return error(409, "The recipient has either been blacklisted, … or exists already.")
        double = self.processes.get(int(form.get("optinProcessId", 0))) == "double"
        data = {k.removeprefix("data."): str(v) for k, v in form.items() if k.startswith("data.")}
        self.lists[list_id][recipient] = Recipient(data, pending=double)
        created = "2026-12-08T10:00:00.000+01:00"
        return web.json_response(
            {"id": recipient, "created": created, "modified": created}, status=202 if double else 201
        )

    async def modify(self, list_id: str, body: dict[str, Any]) -> web.Response:
        """``PUT /recipients/{listId}/modify``: those not on the list fail."""
        self.bodies.append(body)
        failed = []
        for r in body["recipients"]:
            if r["id"] not in self.lists[list_id]:
                failed.append(r["id"])
            else:
                self.lists[list_id][r["id"]].data.update(r["data"])
        return web.json_response({"count": len(body["recipients"]) - len(failed), "failedIds": failed})

    async def unsubscribe(self, request: web.Request, query: dict[str, str]) -> web.Response:
        """``POST /unsubscribes`` (at most 5000; already unsubscribed ones are unsuccessful) and
        ``DELETE /unsubscribes`` (404 when none was unsubscribed)."""
        form = dict(await request.post()) if request.method == "POST" else query
        self.bodies.append(form)
        ids = str(form["recipientIds"]).split(",")
        scope = str(form.get("recipientListId", ""))
        if bool(scope) != self.list_based:
            return error(400, "recipientListId goes with recipient-list based unsubscribes only")
        if request.method == "DELETE":
            lifted = [i for i in ids if scope in self.unsubscribed.get(i, set())]
            for recipient in lifted:
                self.unsubscribed[recipient].discard(scope)
            return web.Response(status=204) if lifted else error(404, "Unsubscribe could not be found")
        if len(ids) > MAX_UNSUBSCRIBE_IDS:
            return error(400, "The recipients could not be unsubscribed: more than 5000 IDs.")
        fresh = [i for i in ids if scope not in self.unsubscribed.get(i, set())]
        if not fresh:
            return error(400, "The recipients could not be unsubscribed.")
        for recipient in fresh:
            self.unsubscribed.setdefault(recipient, set()).add(scope)
        unsuccessful = [i for i in ids if i not in fresh]
        return web.json_response({"successfulIds": fresh, "unsuccessfulIds": unsuccessful})

    def unsubscribes_of(self, query: dict[str, str]) -> web.Response:
        """``GET /unsubscribes?recipientIds=…``: their entries on the list asked about."""
        scope = query.get("recipientListId", "")
        entries = [
            {
                "recipientId": r,
                "reason": "api",
                "created": "2026-12-08T10:00:00.000+01:00",
                "mediaType": "EMAIL",
            }
            for r in query["recipientIds"].split(",")
            if scope in self.unsubscribed.get(r, set())
        ]
        return web.json_response({"elements": entries, "count": len(entries), "offset": 0, "limit": 100})

    def validity(self, query: dict[str, str]) -> web.Response:
        """``GET /recipients?recipientId=&recipientListIds=``: empty for an unknown list."""
        list_id = query["recipientListIds"]
        if list_id not in self.lists:
            return web.json_response([])
        reason = self.valid(query["recipientId"], list_id)
        answer: dict[str, Any] = {"recipientListId": int(list_id), "valid": reason is None}
        if reason is not None:
            answer["validationFailedReason"] = reason
        return web.json_response([answer])


esp = checked_fake(FakeContacts)


def policy_account(url: str, **options: Any) -> AccountConfig:
    """The account ``demo`` syncing the lists 4001 and 4002."""
    made = account(url, **options)
    return made.model_copy(update={"subscriptions": SubscriptionPolicy(lists=LISTS)})


def connector(esp: FakeContacts, **options: Any) -> OptimizelyConnector:
    return OptimizelyConnector(policy_account(esp.url, **options), ConnectorContext(esp.http))


def change(
    email: str,
    state: SubscriptionState | None,
    list_id: str = "4001",
    fields: dict[str, str] | None = None,
    double_opt_in: bool = False,
) -> ContactChange:
    return ContactChange(email, list_id, state, fields or {}, double_opt_in)


def outcome(results: list[ContactResult]) -> list[tuple[str, bool, SubscriptionState | None]]:
    return [(r.email, r.accepted, r.state) for r in results]


# --- start-up -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subscriptions", "options", "says"),
    [
        ({"lists": ["newsletter"]}, {}, "'newsletter', but an Optimizely recipient list id is a number"),
        ({"lists": ["4001"], "double_opt_in": True}, {}, "names no double_opt_in_process_id"),
        ({}, {"contacts_per_call": MAX_UNSUBSCRIBE_IDS + 1}, "contacts_per_call"),
        ({}, {"contact_fields": {"first_name": " "}}, "empty attribute name"),
    ],
)
def test_an_account_optimizely_cannot_sync_is_refused_at_start_up(
    subscriptions: dict[str, Any], options: dict[str, Any], says: str
) -> None:
    made = account("http://127.0.0.1:9/rest", **options)
    made = made.model_copy(update={"subscriptions": SubscriptionPolicy(**subscriptions)})
    with pytest.raises(ConfigurationError, match=says):
        OptimizelyConnector(made, OFFLINE)


def test_a_batch_is_as_large_as_the_option_allows() -> None:
    assert OptimizelyConnector(policy_account("http://x/rest"), OFFLINE).contacts_per_call == 1000
    wide = policy_account("http://x/rest", contacts_per_call=MAX_UNSUBSCRIBE_IDS)
    assert OptimizelyConnector(wide, OFFLINE).contacts_per_call == MAX_UNSUBSCRIBE_IDS


# --- subscribe ------------------------------------------------------------------------------------------


async def test_a_subscribe_lifts_the_unsubscribe_then_adds_the_batch_with_its_fields(
    esp: FakeContacts,
) -> None:
    esp.unsubscribed["b@example.com"] = {""}
    c = connector(esp, contact_fields={"first_name": "firstname"}, opt_in_process_id=SINGLE)
    results = await c.apply_contacts(
        [
            change("a@example.com", SUBSCRIBED, fields={"first_name": "Anna", "city": "Köln"}),
            change("b@example.com", SUBSCRIBED),
        ]
    )
    assert outcome(results) == [("a@example.com", True, SUBSCRIBED), ("b@example.com", True, SUBSCRIBED)]
    lift, add = esp.calls("/unsubscribes")[0], esp.calls("/recipients/4001")[0]
    assert (lift.method, lift.query) == (
        "DELETE",
        {"recipientIds": "a@example.com,b@example.com", "mediaType": "EMAIL"},
    )
    assert add.method == "PUT"
    assert esp.bodies[-1] == {
        "recipients": [
            {"id": "a@example.com", "data": {"firstname": "Anna", "city": "Köln"}},
            {"id": "b@example.com", "data": {}},
        ],
        "optinProcessId": SINGLE,
    }
    assert esp.lists["4001"]["a@example.com"].data == {"firstname": "Anna", "city": "Köln"}
    assert esp.unsubscribed["b@example.com"] == set()


async def test_a_contact_already_on_the_list_is_subscribed_and_gets_its_fields(esp: FakeContacts) -> None:
    esp.lists["4001"]["a@example.com"] = Recipient({"firstname": "Ann"})
    (result,) = await connector(esp).apply_contacts(
        [change("a@example.com", SUBSCRIBED, fields={"firstname": "Anna"})]
    )
    assert (result.accepted, result.state) == (True, SUBSCRIBED)
    assert [s.method + " " + s.path for s in esp.seen[-3:]] == [
        "PUT /1000001/recipients/4001",
        "GET /1000001/recipients",
        "PUT /1000001/recipients/4001/modify",
    ]
    assert esp.bodies[-1] == {
        "updateMode": "set",
        "recipients": [{"id": "a@example.com", "data": {"firstname": "Anna"}}],
    }
    assert esp.lists["4001"]["a@example.com"].data == {"firstname": "Anna"}


async def test_a_double_opt_in_subscribe_goes_through_the_process_and_is_pending(esp: FakeContacts) -> None:
    c = connector(esp, double_opt_in_process_id=DOUBLE)
    results = await c.apply_contacts(
        [
            change("a@example.com", SUBSCRIBED, fields={"firstname": "Anna"}, double_opt_in=True),
            change("b@example.com", PENDING),
        ]
    )
    assert outcome(results) == [("a@example.com", True, PENDING), ("b@example.com", True, PENDING)]
    posts = [s for s in esp.calls("/recipients/4001") if s.method == "POST"]
    assert [p.form for p in posts] == [
        {"recipientId": "a@example.com", "optinProcessId": "102", "data.firstname": "Anna"},
        {"recipientId": "b@example.com", "optinProcessId": "102"},
    ]
    assert esp.lists["4001"]["a@example.com"].pending


async def test_a_double_opt_in_without_its_process_is_refused_without_a_call(esp: FakeContacts) -> None:
    (result,) = await connector(esp).apply_contacts([change("a@example.com", PENDING)])
    assert not result.accepted
    assert "double_opt_in_process_id" in result.detail
    assert esp.seen == []


# --- unsubscribe, remove, update --------------------------------------------------------------------------


async def test_an_unsubscribe_is_one_bulk_call_and_one_already_unsubscribed_is_done(
    esp: FakeContacts,
) -> None:
    esp.unsubscribed["b@example.com"] = {""}
    results = await connector(esp).apply_contacts(
        [change("a@example.com", UNSUBSCRIBED), change("b@example.com", UNSUBSCRIBED, "4002")]
    )
    assert outcome(results) == [
        ("a@example.com", True, UNSUBSCRIBED),
        ("b@example.com", True, UNSUBSCRIBED),
    ]
    posts = [s for s in esp.calls("/unsubscribes") if s.method == "POST"]
    assert [p.form for p in posts] == [
        {"recipientIds": "a@example.com", "mediaType": "EMAIL"},
        {"recipientIds": "b@example.com", "mediaType": "EMAIL"},
    ]
    assert esp.calls("/unsubscribes")[-1].query["recipientIds"] == "b@example.com"  # asked: already there
    assert esp.unsubscribed["a@example.com"] == {""}


async def test_list_unsubscribes_name_the_recipient_list_and_fields_are_set_first(esp: FakeContacts) -> None:
    esp.lists["4002"]["a@example.com"] = Recipient({})
    esp.list_based = True
    c = connector(esp, list_unsubscribes=True)
    (result,) = await c.apply_contacts(
        [change("a@example.com", UNSUBSCRIBED, "4002", fields={"reason_text": "too many"})]
    )
    assert (result.accepted, result.state) == (True, UNSUBSCRIBED)
    assert [s.method + " " + s.path for s in esp.seen] == [
        "PUT /1000001/recipients/4002/modify",
        "POST /1000001/unsubscribes",
    ]
    assert esp.seen[-1].form == {
        "recipientIds": "a@example.com",
        "mediaType": "EMAIL",
        "recipientListId": "4002",
    }
    assert esp.unsubscribed["a@example.com"] == {"4002"}


async def test_a_removal_deletes_the_recipients_by_id_as_many_a_call_as_a_url_holds(
    esp: FakeContacts,
) -> None:
    emails = [f"person{n:04d}-with-a-longish-address@example.com" for n in range(300)]
    esp.lists["4001"] = {e: Recipient({}) for e in [*emails, "stays@example.com"]}
    results = await connector(esp).apply_contacts([change(e, REMOVED) for e in emails])
    assert {(r.accepted, r.state) for r in results} == {(True, REMOVED)}
    deletes = esp.calls("/recipients/4001")
    assert len(deletes) > 1
    assert all(d.method == "DELETE" and len(d.query["recipientIds"]) <= 6000 for d in deletes)
    assert [i for d in deletes for i in d.query["recipientIds"].split(",")] == emails
    assert list(esp.lists["4001"]) == ["stays@example.com"]


async def test_fields_alone_are_an_update_and_one_not_on_the_list_is_refused(esp: FakeContacts) -> None:
    esp.lists["4001"]["a@example.com"] = Recipient({"firstname": "Ann"})
    results = await connector(esp).apply_contacts(
        [
            change("a@example.com", None, fields={"firstname": "Anna"}),
            change("z@example.com", None, fields={"firstname": "Zoe"}),
        ]
    )
    assert outcome(results) == [("a@example.com", True, None), ("z@example.com", False, None)]
    assert results[1].detail.endswith("it is not on the list")
    assert esp.lists["4001"]["a@example.com"].data == {"firstname": "Anna"}


# --- refusals, batching, order, outages -------------------------------------------------------------------


async def test_refused_contacts_say_why_and_the_others_go_through(esp: FakeContacts) -> None:
    esp.blocked.add("blocked@example.com")
    results = await connector(esp).apply_contacts(
        [
            change("blocked@example.com", SUBSCRIBED),
            change("fine@example.com", SUBSCRIBED),
            change("x@example.com", SUBSCRIBED, list_id="9999"),
            change("y@example.com", UNSUBSCRIBED, list_id="newsletter"),
            change("z@example.com", SUBSCRIBED, fields={"email": "other@example.com"}),
        ]
    )
    assert [r.accepted for r in results] == [False, True, False, False, False]
    assert "set by espbridge itself" in results[4].detail
    assert results[0].detail == "Optimizely did not add it to recipient list 4001: it is on the blocklist"
    assert "Optimizely does not know recipient list 9999" in results[2].detail
    assert "'newsletter' is not an Optimizely recipient list id" in results[3].detail
    assert "fine@example.com" in esp.lists["4001"]


async def test_an_unsubscribe_list_set_up_otherwise_refuses_with_optimizelys_words(esp: FakeContacts) -> None:
    c = connector(esp, list_unsubscribes=True)  # but the client's unsubscribe list is its own
    results = await c.apply_contacts(
        [change("a@example.com", SUBSCRIBED), change("b@example.com", UNSUBSCRIBED)]
    )
    assert [r.accepted for r in results] == [False, False]
    assert results[0].detail == (
        "DELETE /unsubscribes answered 400: recipientListId goes with recipient-list based unsubscribes only"
    )
    assert results[1].detail.endswith("recipientListId goes with recipient-list based unsubscribes only")
    assert esp.calls("/recipients/4001") == [], "no add after a lift that failed"


async def test_five_thousand_unsubscribes_are_one_call(esp: FakeContacts) -> None:
    c = connector(esp, contacts_per_call=MAX_UNSUBSCRIBE_IDS)
    emails = [f"p{n}@example.com" for n in range(c.contacts_per_call)]
    results = await c.apply_contacts([change(e, UNSUBSCRIBED) for e in emails])
    assert all(r.accepted for r in results)
    (post,) = esp.calls("/unsubscribes")
    assert post.form["recipientIds"].split(",") == emails


async def test_two_changes_of_one_contact_in_a_batch_are_made_in_their_order(esp: FakeContacts) -> None:
    results = await connector(esp).apply_contacts(
        [
            change("a@example.com", UNSUBSCRIBED),
            change("b@example.com", UNSUBSCRIBED),
            change("a@example.com", SUBSCRIBED),
        ]
    )
    assert [r.state for r in results] == [UNSUBSCRIBED, UNSUBSCRIBED, SUBSCRIBED]
    assert [(s.method, s.path) for s in esp.seen] == [
        ("POST", "/1000001/unsubscribes"),
        ("DELETE", "/1000001/unsubscribes"),
        ("PUT", "/1000001/recipients/4001"),
    ]
    assert esp.unsubscribed["a@example.com"] == set()
    assert esp.valid("a@example.com", "4001") is None


async def test_an_outage_is_retried_and_one_that_lasts_raises_for_the_whole_batch(esp: FakeContacts) -> None:
    esp.faults = [(503, {"Retry-After": "0"})]
    (result,) = await connector(esp).apply_contacts([change("a@example.com", UNSUBSCRIBED)])
    assert result.accepted
    assert len(esp.calls("/unsubscribes")) == 2
    esp.faults = [(429, {"Retry-After": "60"})]
    with pytest.raises(EspUnavailableError):
        await connector(esp, timeout=1.0).apply_contacts([change("b@example.com", UNSUBSCRIBED)])
    assert "b@example.com" not in esp.unsubscribed


# --- what Optimizely reports: webhooks --------------------------------------------------------------------


def hook(kind: str, **item: Any) -> dict[str, Any]:
    """A webhook item of a synced list's recipient (its id is the email address)."""
    return {
        "webhookId": 21,
        "type": kind,
        "clientId": "1000001",
        "recipientListId": 4001,
        "recipientId": "a@example.com",
        "created": "2026-12-08T10:00:03.250+01:00",
        **item,
    }


def parsed(c: OptimizelyConnector, *items: dict[str, Any]) -> list[Any]:
    return c.parse_webhook(HOOK_AUTH, orjson.dumps(list(items)))


@pytest.mark.parametrize(
    ("kind", "extra", "state", "reason", "list_id"),
    [
        ("doubleoptin", {}, SUBSCRIBED, "doubleoptin", "4001"),
        ("singleoptin", {}, SUBSCRIBED, "singleoptin", "4001"),
        ("confirmedoptin", {"recipientListId": "4002"}, SUBSCRIBED, "confirmedoptin", "4002"),
        ("unsubscribe", {"reason": "link"}, UNSUBSCRIBED, "unsubscribe", "4001"),
        ("spamcomplaint", {}, UNSUBSCRIBED, "complaint", "4001"),
        ("blocklist", {}, UNSUBSCRIBED, "blocklist", "4001"),
        ("bounce", {"category": "hardbounce"}, UNSUBSCRIBED, "bounce_hard", "4001"),
        ("unsubscribe", {"recipientListId": 3001}, UNSUBSCRIBED, "unsubscribe", ""),
        ("unsubscribe", {"recipientListId": None}, UNSUBSCRIBED, "unsubscribe", ""),
    ],
)
async def test_a_contacts_opt_in_or_opt_out_is_a_subscription_change(
    esp: FakeContacts,
    kind: str,
    extra: dict[str, Any],
    state: SubscriptionState,
    reason: str,
    list_id: str,
) -> None:
    (item,) = parsed(connector(esp), hook(kind, **extra))
    assert isinstance(item, SubscriptionChange)
    assert (item.email, item.esp, item.account, item.list) == ("a@example.com", "optimizely", "demo", list_id)
    assert (item.state, item.reason) == (state, reason)
    assert item.occurred_at == datetime(2026, 12, 8, 9, 0, 3, 250000, tzinfo=UTC)


async def test_the_same_change_read_twice_has_one_id_and_another_has_its_own(esp: FakeContacts) -> None:
    c = connector(esp)
    first, again, later, other_list = parsed(
        c,
        hook("unsubscribe"),
        hook("unsubscribe"),
        hook("unsubscribe", created="2026-12-08T10:05:00+01:00"),
        hook("unsubscribe", recipientListId=4002),
    )
    assert first.change_id == again.change_id
    assert len({first.change_id, later.change_id, other_list.change_id}) == 3


async def test_a_broadcasts_unsubscribe_stays_a_response_event(esp: FakeContacts) -> None:
    data = {"email": "a@example.com", "CommunicationKey": "K1", "BroadcastId": "job-1"}
    (item,) = parsed(connector(esp), hook("unsubscribe", recipientId="K1", mailingId=8004, data=data))
    assert isinstance(item, ResponseEvent)
    assert (item.type, item.broadcast_id, item.email) == (EventType.UNSUBSCRIBE, "job-1", "a@example.com")


async def test_the_email_comes_from_the_data_when_the_recipient_id_is_not_one(esp: FakeContacts) -> None:
    (item,) = parsed(connector(esp), hook("spamcomplaint", recipientId="K1", data={"email": "B@Example.com"}))
    assert isinstance(item, SubscriptionChange)
    assert item.email == "b@example.com"


async def test_an_opt_in_to_a_list_espbridge_does_not_sync_is_passed_over(esp: FakeContacts) -> None:
    assert (
        parsed(
            connector(esp),
            hook("doubleoptin", recipientListId=3001),
            hook("singleoptin", recipientListId=None),
        )
        == []
    )


async def test_a_change_without_an_address_or_time_is_a_bad_row_with_its_index(esp: FakeContacts) -> None:
    items = parsed(
        connector(esp),
        hook("unsubscribe"),
        hook("unsubscribe", recipientId="K1"),
        hook("doubleoptin", created="soon"),
        hook("bounce", category="softbounce"),
    )
    bad = {i.line: i.error for i in items if isinstance(i, BadRow)}
    assert [type(i) for i in items if not isinstance(i, BadRow)] == [SubscriptionChange]
    assert set(bad) == {2, 3, 4}
    assert "no email address" in bad[2]
    assert "created" in bad[3]
    assert "BroadcastId" in bad[4]  # a soft bounce without a broadcast changes no subscription
