"""The mailup connector's subscription sync against the fake MailUp of test_mailup_connector, grown by
the recipient calls docs/connectors/mailup.md#subscriptions names: every call's method, path, query
and body, refused contacts, outages; and the Subscribe, Unsubscribe and Delete webhooks read as
subscription changes."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import web

from shared.esp import BadRow
from shared.esp.base import ContactChange, ContactResult
from shared.esp.contacts import change_id
from shared.esp.rest import EspUnavailableError
from shared.model.errors import ConfigurationError
from shared.model.messages import ResponseEvent, SubscriptionChange, SubscriptionState
from tests.fixtures.fake_esp import served
from tests.unit.test_mailup_connector import (
    CONSOLE,
    WEBHOOK,
    FakeMailUp,
    _envelope,
    _error,
    _hook,
    make,
    offline,
)

SUBSCRIBED, PENDING, UNSUBSCRIBED, REMOVED = (
    SubscriptionState.SUBSCRIBED,
    SubscriptionState.PENDING,
    SubscriptionState.UNSUBSCRIBED,
    SubscriptionState.REMOVED,
)
STATUS = {"Subscribed": SUBSCRIBED, "Pending": PENDING, "Unsubscribed": UNSUBSCRIBED}


@dataclass(frozen=True)
class Write:
    """A recipient call that changes something, as MailUp received it."""

    method: str
    path: str
    query: dict[str, str]
    body: Any


@dataclass
class FakeMailUpContacts(FakeMailUp):
    """The fake MailUp with lists of recipients and the synchronous recipient calls."""

    lists: set[int] = field(default_factory=lambda: {1, 2})
    recipients: dict[str, int] = field(default_factory=dict)
    """Recipient ids by email (account-wide, as MailUp's)."""
    status: dict[tuple[int, str], SubscriptionState] = field(default_factory=dict)
    bounced: set[str] = field(default_factory=set)
    """Unsubscribed after hard bounces: MailUp refuses to subscribe them again by API."""
    writes: list[Write] = field(default_factory=list)
    outage: int = 0
    """Answer the next n recipient writes with a 503."""

    def application(self) -> web.Application:
        app = super().application()
        _contact_routes(self, app)
        return app

    def has(self, email: str, list_id: int = 1, state: SubscriptionState = SUBSCRIBED) -> int:
        """Put a recipient on a list in a state; its id."""
        recipient = self.recipients.setdefault(email, 100 + len(self.recipients))
        self.status[list_id, email] = state
        return recipient

    def lookups(self) -> list[tuple[str, str]]:
        """The status lookups made: (status, filterby)."""
        return [
            (c.path.rsplit("/", 1)[1], c.query.get("filterby", "")) for c in self.api_calls("/Recipients/")
        ]


def _contact_routes(fake: FakeMailUpContacts, app: web.Application) -> None:
    @web.middleware
    async def outage(request: web.Request, handler: Any) -> web.StreamResponse:
        if fake.outage and request.method != "GET" and "/Recipient" in request.path:
            fake.outage -= 1
            response = _error(503, "Service unavailable", None)
            response.headers["Retry-After"] = "0"
            return response
        result: web.StreamResponse = await handler(request)
        return result

    app.middlewares.append(outage)

    def known_list(request: web.Request) -> int:
        list_id = int(request.match_info["list"])
        if list_id not in fake.lists:
            raise web.HTTPNotFound(
                text='{"ErrorCode":"404","ErrorDescription":"List not found","ErrorName":"NotFound"}',
                content_type="application/json",
            )
        return list_id

    def id_of(request: web.Request) -> str:
        wanted = int(request.match_info["recipient"])
        return next(email for email, number in fake.recipients.items() if number == wanted)

    async def record(request: web.Request) -> Any:
        body = await request.json() if request.can_read_body else None
        fake.writes.append(
            Write(request.method, request.path.removeprefix(CONSOLE), dict(request.query), body)
        )
        return body

    async def by_status(request: web.Request) -> web.Response:
        list_id = known_list(request)
        state = STATUS[request.match_info["status"]]
        wanted = request.query.get("filterby", "").strip('"').removeprefix("Email=='").removesuffix("'")
        items = [
            {"Email": email, "Fields": [], "Name": "", "idRecipient": fake.recipients[email]}
            for (listed, email), held in fake.status.items()
            if listed == list_id and held is state and email == wanted.replace("''", "'")
        ]
        return _envelope(fake, request, items)

    async def add(request: web.Request) -> web.Response:
        list_id = known_list(request)
        body = await record(request)
        email = body["Email"]
        if "@" not in email:
            return _error(400, f"Invalid email address {email}", "BadRequest")
        pending = request.query.get("ConfirmEmail") == "true"
        recipient = fake.has(email, list_id, PENDING if pending else SUBSCRIBED)
        return web.json_response(recipient)

    async def subscribe(request: web.Request) -> web.Response:
        list_id, email = known_list(request), id_of(request)
        await record(request)
        if email in fake.bounced:
            return _error(400, "Recipient unsubscribed after bounces cannot be subscribed", "BadRequest")
        fake.status[list_id, email] = SUBSCRIBED
        return web.json_response(True)

    async def unsubscribe(request: web.Request) -> web.Response:
        list_id, email = known_list(request), id_of(request)
        await record(request)
        fake.status[list_id, email] = UNSUBSCRIBED
        return web.json_response(True)

    async def remove(request: web.Request) -> web.Response:
        list_id, email = known_list(request), id_of(request)
        await record(request)
        del fake.status[list_id, email]
        return web.json_response(True)

    async def detail(request: web.Request) -> web.Response:
        body = await record(request)
        return web.json_response({**body, "Name": "", "MobileNumber": None, "MobilePrefix": None})

    app.router.add_get(CONSOLE + "/Console/List/{list}/Recipients/{status}", by_status)
    app.router.add_post(CONSOLE + "/Console/List/{list}/Recipient", add)
    app.router.add_post(CONSOLE + "/Console/List/{list}/Subscribe/{recipient}", subscribe)
    app.router.add_delete(CONSOLE + "/Console/List/{list}/Unsubscribe/{recipient}", unsubscribe)
    app.router.add_delete(CONSOLE + "/Console/List/{list}/Recipient/{recipient}", remove)
    app.router.add_put(CONSOLE + "/Console/Recipient/Detail", detail)


fake = served(FakeMailUpContacts, name="fake")

ANNA = "anna@example.com"
FILTER = "\"Email=='anna@example.com'\""


def change(state: SubscriptionState | None, list_id: str = "1", **values: Any) -> ContactChange:
    return ContactChange(email=values.pop("email", ANNA), list=list_id, state=state, **values)


async def apply(fake: FakeMailUpContacts, *changes: ContactChange, **options: Any) -> list[ContactResult]:
    return await make(fake, **options).apply_contacts(changes)


# --- pushes to MailUp ----------------------------------------------------------------------------------


async def test_a_new_contact_is_looked_for_on_the_list_then_added_with_its_fields(
    fake: FakeMailUpContacts,
) -> None:
    (result,) = await apply(fake, change(SUBSCRIBED, fields={"FirstName": "Anna", "Company": "ACME"}))
    assert result == ContactResult(ANNA, "1", True, SUBSCRIBED)
    assert fake.lookups() == [("Subscribed", FILTER), ("Pending", FILTER), ("Unsubscribed", FILTER)]
    assert fake.writes == [
        Write(
            "POST",
            "/Console/List/1/Recipient",
            {},
            {"Email": ANNA, "Fields": [{"Id": 1, "Value": "Anna"}, {"Id": 3, "Value": "ACME"}]},
        )
    ]
    assert fake.status[1, ANNA] is SUBSCRIBED


@pytest.mark.parametrize(
    "wanted",
    [change(SUBSCRIBED, double_opt_in=True), change(PENDING)],
    ids=["double-opt-in", "pending"],
)
async def test_a_double_opt_in_asks_mailup_to_send_its_confirmation_and_stays_pending(
    fake: FakeMailUpContacts, wanted: ContactChange
) -> None:
    (result,) = await apply(fake, wanted)
    assert (result.accepted, result.state) == (True, PENDING)
    assert [(w.method, w.path, w.query) for w in fake.writes] == [
        ("POST", "/Console/List/1/Recipient", {"ConfirmEmail": "true"})
    ]


async def test_an_unsubscribed_contact_is_subscribed_again_by_its_recipient_id(
    fake: FakeMailUpContacts,
) -> None:
    recipient = fake.has(ANNA, state=UNSUBSCRIBED)
    (result,) = await apply(fake, change(SUBSCRIBED, fields={"LastName": "Bo"}))
    assert (result.accepted, result.state) == (True, SUBSCRIBED)
    assert fake.writes == [
        Write(
            "PUT",
            "/Console/Recipient/Detail",
            {},
            {"idRecipient": recipient, "Email": ANNA, "Fields": [{"Id": 2, "Value": "Bo"}]},
        ),
        Write("POST", f"/Console/List/1/Subscribe/{recipient}", {}, None),
    ]


async def test_a_double_opt_in_resubscribe_goes_through_the_confirmation(fake: FakeMailUpContacts) -> None:
    fake.has(ANNA, state=UNSUBSCRIBED)
    (result,) = await apply(fake, change(SUBSCRIBED, double_opt_in=True))
    assert result.state is PENDING
    assert [(w.path, w.query) for w in fake.writes] == [
        ("/Console/List/1/Recipient", {"ConfirmEmail": "true"})
    ]


@pytest.mark.parametrize(
    ("state", "method", "path", "after"),
    [
        (UNSUBSCRIBED, "DELETE", "/Console/List/2/Unsubscribe/{id}", UNSUBSCRIBED),
        (REMOVED, "DELETE", "/Console/List/2/Recipient/{id}", None),
    ],
)
async def test_unsubscribe_and_remove_name_the_recipient_on_its_list(
    fake: FakeMailUpContacts,
    state: SubscriptionState,
    method: str,
    path: str,
    after: SubscriptionState | None,
) -> None:
    recipient = fake.has(ANNA, list_id=2)
    fake.has(ANNA, list_id=1)
    (result,) = await apply(fake, change(state, list_id="2"))
    assert result == ContactResult(ANNA, "2", True, state)
    assert fake.writes == [Write(method, path.format(id=recipient), {}, None)]
    assert (fake.status.get((2, ANNA)), fake.status[1, ANNA]) == (after, SUBSCRIBED)


async def test_a_pending_contact_is_unsubscribed_too(fake: FakeMailUpContacts) -> None:
    recipient = fake.has(ANNA, state=PENDING)
    (result,) = await apply(fake, change(UNSUBSCRIBED))
    assert result.state is UNSUBSCRIBED
    assert fake.lookups() == [("Subscribed", FILTER), ("Pending", FILTER)]
    assert [w.path for w in fake.writes] == [f"/Console/List/1/Unsubscribe/{recipient}"]


async def test_fields_alone_are_set_on_the_recipient_and_its_state_is_reported(
    fake: FakeMailUpContacts,
) -> None:
    recipient = fake.has(ANNA, state=PENDING)
    (result,) = await apply(fake, change(None, fields={"City": "Milan"}), contact_fields={"City": 4})
    assert result == ContactResult(ANNA, "1", True, PENDING)
    assert fake.writes == [
        Write(
            "PUT",
            "/Console/Recipient/Detail",
            {},
            {"idRecipient": recipient, "Email": ANNA, "Fields": [{"Id": 4, "Value": "Milan"}]},
        )
    ]
    assert fake.api_calls("DynamicFields") == []  # contact_fields named it


@pytest.mark.parametrize(
    ("held", "wanted"),
    [(SUBSCRIBED, change(SUBSCRIBED)), (PENDING, change(PENDING)), (UNSUBSCRIBED, change(UNSUBSCRIBED))],
    ids=["subscribed", "pending", "unsubscribed"],
)
async def test_a_contact_already_in_the_state_asked_for_is_left_alone(
    fake: FakeMailUpContacts, held: SubscriptionState, wanted: ContactChange
) -> None:
    fake.has(ANNA, state=held)
    (result,) = await apply(fake, wanted)
    assert (result.accepted, result.state, fake.writes) == (True, held, [])


@pytest.mark.parametrize("state", [UNSUBSCRIBED, REMOVED, None])
async def test_a_contact_mailup_does_not_have_on_the_list_needs_no_call(
    fake: FakeMailUpContacts, state: SubscriptionState | None
) -> None:
    fake.has(ANNA, list_id=2)
    (result,) = await apply(fake, change(state, fields={"FirstName": "A"}))
    assert (result.accepted, result.state, fake.writes) == (True, None, [])
    assert "not a recipient of MailUp list 1" in result.detail


@pytest.mark.parametrize(
    ("wanted", "reason"),
    [
        (change(SUBSCRIBED, email="not-an-address"), "answered 400: Invalid email address not-an-address"),
        (change(UNSUBSCRIBED, list_id="7"), "MailUp knows no list 7"),
        (change(UNSUBSCRIBED, list_id="news"), "'news' is not a MailUp list id"),
        (
            change(None, fields={"Shoe": "42"}),
            "no personal data field 'Shoe' (known: Company, FirstName, LastName)",
        ),
        (change(None, fields={"EspbridgeJob": "x"}), "field 39, which holds espbridge's key or job"),
        (change(None, fields={"FirstName": "x" * 201}), "over 200 characters"),
    ],
    ids=["invalid-address", "unknown-list", "not-a-list-id", "unknown-field", "job-field", "too-long"],
)
async def test_a_contact_mailup_refuses_is_a_refused_result_with_the_reason(
    fake: FakeMailUpContacts, wanted: ContactChange, reason: str
) -> None:
    fake.has(ANNA)
    (result,) = await apply(fake, wanted)
    assert (result.email, result.list, result.accepted) == (wanted.email, wanted.list, False)
    assert reason in result.detail


async def test_a_refused_contact_leaves_the_others_of_the_call_applied_in_order(
    fake: FakeMailUpContacts,
) -> None:
    fake.has(ANNA, state=UNSUBSCRIBED)
    fake.bounced.add(ANNA)
    results = await apply(
        fake,
        change(SUBSCRIBED, email="bo@example.com"),
        change(SUBSCRIBED),
        change(UNSUBSCRIBED, email="bo@example.com"),
    )
    assert [(r.email, r.accepted, r.state) for r in results] == [
        ("bo@example.com", True, SUBSCRIBED),
        (ANNA, False, None),
        ("bo@example.com", True, UNSUBSCRIBED),
    ]
    assert "cannot be subscribed" in results[1].detail
    assert make(fake).contacts_per_call == 1


async def test_an_outage_raises_and_the_change_applied_again_is_done_once(fake: FakeMailUpContacts) -> None:
    fake.outage = 1
    with pytest.raises(EspUnavailableError, match="503"):
        await apply(fake, change(SUBSCRIBED))
    assert fake.writes == []
    (result,) = await apply(fake, change(SUBSCRIBED))
    assert (result.accepted, fake.status[1, ANNA]) == (True, SUBSCRIBED)
    assert [w.path for w in fake.writes] == ["/Console/List/1/Recipient"]


async def test_a_429_is_waited_out_and_the_call_repeated(fake: FakeMailUpContacts) -> None:
    fake.has(ANNA)
    mailup = make(fake)
    await mailup.apply_contacts([change(SUBSCRIBED)])  # the token is fetched
    fake.limit_next = 2
    (result,) = await mailup.apply_contacts([change(UNSUBSCRIBED)])
    assert (result.accepted, fake.status[1, ANNA]) == (True, UNSUBSCRIBED)


def test_contact_options_are_checked_at_the_start() -> None:
    assert offline(contact_fields={"City": 4}).options.contact_fields == {"City": 4}
    with pytest.raises(ConfigurationError, match="not a field number"):
        offline(contact_fields={"City": 40})
    with pytest.raises(ConfigurationError, match=r"field 38 holds espbridge's key \(key_field\)"):
        offline(contact_fields={"Code": 38})
    with pytest.raises(ConfigurationError, match="an Unsubscribe reports the state unsubscribed"):
        offline(webhook_events={"Unsubscribe": "subscribed"})
    with pytest.raises(ConfigurationError, match="remove_recipient_path"):
        offline(remove_recipient_path="/Console/List/{list}/Recipient/{id}")


# --- changes made at MailUp, reported by its webhooks ------------------------------------------------------

ESP_SIDE = {**WEBHOOK, "EventSource": "Console", "IdNL": "0", "Job": "", "Key": "", "IdList": "2"}
WHEN = datetime(2026, 11, 22, 11, 0, 3, 695000, tzinfo=UTC)


@pytest.mark.parametrize(
    ("changes", "state", "reason"),
    [
        ({"EventType": "Subscribe", "Reason": ""}, SUBSCRIBED, "subscribe"),
        ({"EventType": "SUBSCRIBE", "Reason": ""}, SUBSCRIBED, "subscribe"),
        ({"EventType": "Delete", "Reason": ""}, REMOVED, "delete"),
        ({"Reason": "0"}, UNSUBSCRIBED, "unsubscribe"),
        ({"Reason": "1", "EventSource": "Recipient"}, UNSUBSCRIBED, "unsubscribe"),
        ({"Reason": "2", "EventSource": "Recipient"}, UNSUBSCRIBED, "complaint"),
        ({"Reason": "3"}, UNSUBSCRIBED, "bounce_hard"),
        ({"IdNL": "42"}, UNSUBSCRIBED, "unsubscribe"),  # a message, but a recipient espbridge did not import
    ],
    ids=["subscribe", "upper-case", "delete", "console", "link", "complaint", "bounce", "not-espbridges"],
)
def test_a_subscription_event_at_mailup_is_a_change_of_its_list(
    changes: dict[str, str], state: SubscriptionState, reason: str
) -> None:
    (item,) = _hook(offline(), **{**ESP_SIDE, **changes})
    assert isinstance(item, SubscriptionChange)
    assert (item.email, item.esp, item.account, item.list, item.state, item.reason, item.occurred_at) == (
        ANNA,
        "mailup",
        "demo",
        "2",
        state,
        reason,
        WHEN,
    )


def test_the_same_event_read_twice_is_one_change_and_another_is_not() -> None:
    mailup = offline()
    (first,) = _hook(mailup, **ESP_SIDE)
    (again,) = _hook(
        mailup, **{**ESP_SIDE, "EventDate": "2026-11-22T11:00:03.695+00:00", "Email": "ANNA@example.com"}
    )
    (later,) = _hook(mailup, **{**ESP_SIDE, "EventDate": "2026-11-22T12:00:04+01"})
    (subscribe,) = _hook(mailup, **{**ESP_SIDE, "EventType": "Subscribe"})
    assert isinstance(first, SubscriptionChange)
    assert isinstance(again, SubscriptionChange)
    assert first.change_id == again.change_id
    assert first.change_id == change_id(
        "mailup", "demo", email=ANNA, list_id="2", state="unsubscribed:unsubscribe", occurred_at=WHEN
    )
    assert (
        len({first.change_id, getattr(later, "change_id", None), getattr(subscribe, "change_id", None)}) == 3
    )


def test_an_unsubscribe_by_a_jobs_message_stays_that_broadcasts_event() -> None:
    (event,) = _hook(offline(), **{**ESP_SIDE, "IdNL": "42", "Job": "42:job-1", "Reason": "1"})
    assert isinstance(event, ResponseEvent)
    assert event.broadcast_id == "job-1"


def test_webhook_events_the_account_names_report_their_state() -> None:
    mailup = offline(webhook_events={"SubscribeRequest": "pending", "Subscribe": None})
    (pending,) = _hook(mailup, **{**ESP_SIDE, "EventType": "subscriberequest"})
    assert isinstance(pending, SubscriptionChange)
    assert pending.state is PENDING
    assert _hook(mailup, **{**ESP_SIDE, "EventType": "Subscribe"}) == []
    assert _hook(mailup, **{**ESP_SIDE, "EventType": "ChangeProfile"}) == []
    assert _hook(mailup, **{**ESP_SIDE, "EventType": "Birthday"}) == []


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"Email": "not an address"}, "email"),
        ({"Email": ""}, "no Email"),
        ({"IdList": "news"}, "IdList 'news' is not a list id"),
        ({"EventDate": "yesterday"}, "EventDate"),
        ({"Reason": "9"}, "unknown unsubscribe Reason '9'"),
    ],
)
def test_a_subscription_event_that_does_not_fit_is_a_bad_row_without_the_secret(
    changes: dict[str, str], error: str
) -> None:
    (bad,) = _hook(offline(), **{**ESP_SIDE, **changes})
    assert isinstance(bad, BadRow)
    assert error in bad.error
    assert b"s3cr3t" not in bad.raw


def test_a_change_without_a_list_belongs_to_the_accounts_broadcast_list() -> None:
    form = {
        "Secret": "s3cr3t",
        "EventType": "Delete",
        "EventDate": "2026-11-22T12:00:03.695+01",
        "Email": ANNA,
    }
    (item,) = offline().parse_webhook({}, urlencode(form).encode())
    assert isinstance(item, SubscriptionChange)
    assert (item.list, item.state) == ("", REMOVED)
